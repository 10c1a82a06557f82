//! tokn$ data plane: a Pingora proxy serving the OpenAI-compatible API.
//!
//! Start at [`server::build`] (wiring) and [`gateway::Gateway`] (the request path).

pub mod balances;
pub mod batch;
pub mod chat;
pub mod clock;
pub mod control;
pub mod drain;
pub mod embeddings;
pub mod error;
pub mod gateway;
pub mod headers;
pub mod health;
pub mod hot_state;
pub mod keys;
pub mod messages;
pub mod messages_lane;
pub mod metrics;
pub mod money;
pub mod ops;
pub mod providers;
pub mod relay;
pub mod responses;
pub mod responses_lane;
pub mod retry;
pub mod server;
pub mod shipper;
pub mod snapshot;
pub mod spool;
pub mod sticky;
pub mod sync;
pub mod upstream;
pub mod usage;
pub mod via;

/// The module map stays a hierarchy: no module reaches, through its `crate::` imports, back to
/// itself (tests excluded). Read from the sources, so a new circle fails here, not in review.
#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The top-level modules a file's non-test code names as `crate::…`.
    fn add_imports(file: &Path, into: &mut BTreeSet<String>) {
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            into.insert(name);
        }
    }

    /// Every file of a module: `name.rs` and whatever is under `name/`.
    fn add_dir(dir: &Path, into: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                add_dir(&path, into);
            } else {
                add_imports(&path, into);
            }
        }
    }

    #[test]
    fn no_module_imports_itself_through_others() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let Some(name) = path.file_stem().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if name == "lib" || name == "main" {
                continue;
            }
            let deps = graph.entry(name.clone()).or_default();
            if path.is_dir() {
                add_dir(&path, deps);
            } else {
                add_imports(&path, deps);
            }
            deps.remove(&name);
        }
        assert!(graph.contains_key("gateway") && graph["gateway"].contains("providers"));
        for start in graph.keys() {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<&String> = graph[start].iter().collect();
            while let Some(m) = todo.pop() {
                assert_ne!(m, start, "`{start}` imports itself through {seen:?}");
                if seen.insert(m.clone()) {
                    todo.extend(graph.get(m).into_iter().flatten());
                }
            }
        }
    }
}
