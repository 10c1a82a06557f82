//! Deserializing a configuration file so that every unknown field and mistyped value is
//! reported at once, each with its path (`server.listen[0]`), rather than only the first.

use serde::de::DeserializeOwned;

/// Deserializes a configuration, listing every unknown field and mistyped value at once:
/// each is noted with its path and taken out of the table, and deserialization runs again
/// (each round removes a key, so the rounds are bounded). A problem that removing cannot
/// clear (a required field missing) ends the list. With problems, returns them together
/// with the configuration made of the rest (when there is one), for validation to add its
/// own.
pub(crate) fn deserialize_all<T: DeserializeOwned>(
    mut table: toml::Table,
) -> (Option<T>, Vec<String>) {
    let mut problems = Vec::new();
    loop {
        let value = toml::Value::Table(table.clone());
        let e = match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(config) => return (Some(config), problems),
            Err(e) => e,
        };
        // The first line: the rest repeats the path.
        let message = e.inner().to_string();
        let message = message.lines().next().unwrap_or_default().to_owned();
        let mut path: Vec<PathStep> = e.path().iter().filter_map(PathStep::of).collect();
        // An unknown field's error may name only the table it is in.
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
        {
            if !matches!(path.last(), Some(PathStep::Key(k)) if k == field) {
                path.push(PathStep::Key(field.to_owned()));
            }
        }
        // A missing field is named where it is missing (removing its table may still clear it).
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(|field| PathStep::Key(field.to_owned()));
        let shown: Vec<&PathStep> = path.iter().chain(&missing).collect();
        problems.push(format!("{}: {message}", PathStep::display(&shown)));
        if !remove_at(&mut table, &path) {
            return (None, problems);
        }
    }
}

/// A step of a field's path in the configuration.
enum PathStep {
    Key(String),
    Index(usize),
}

impl PathStep {
    fn of(segment: &serde_path_to_error::Segment) -> Option<Self> {
        match segment {
            serde_path_to_error::Segment::Map { key } => Some(Self::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Self::Index(*index)),
            _ => None,
        }
    }

    /// `server.listen[0]`.
    fn display(path: &[&Self]) -> String {
        let mut out = String::new();
        for step in path {
            match step {
                Self::Key(k) if out.is_empty() => out.push_str(k),
                Self::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Self::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }
}

/// Removes the field at `path` from `table` (a whole array for one of its items, so the other
/// items keep their paths); false if there is none.
fn remove_at(table: &mut toml::Table, mut path: &[PathStep]) -> bool {
    while let [parents @ .., PathStep::Index(_)] = path {
        path = parents;
    }
    match path {
        [PathStep::Key(k)] => table.remove(k).is_some(),
        [PathStep::Key(k), rest @ ..] => table.get_mut(k).is_some_and(|v| remove_in(v, rest)),
        _ => false,
    }
}

fn remove_in(value: &mut toml::Value, path: &[PathStep]) -> bool {
    match (value, path) {
        (toml::Value::Table(t), _) => remove_at(t, path),
        (toml::Value::Array(a), [PathStep::Index(i), rest @ ..]) => {
            a.get_mut(*i).is_some_and(|v| remove_in(v, rest))
        }
        _ => false,
    }
}
