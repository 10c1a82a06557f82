//! Environment overrides: `TOKN__SECTION__FIELD=value` sets `section.field`.
//!
//! Segments are lower-cased; a numeric segment indexes an array (`TOKN__POOLS__0__BASE_URL`).
//! The value is read as a TOML value when it parses as one (`30`, `true`, `["a","b"]`) and as a
//! string otherwise.

use crate::{ConfigProblems, ENV_PREFIX};

/// Applies every `TOKN__…` variable to `table`; returns how many were applied.
pub fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<usize, ConfigProblems> {
    let mut problems = Vec::new();
    let mut applied = 0;
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        match set_path(table, &path, parse_value(&raw)) {
            Ok(()) => applied += 1,
            Err(why) => problems.push(format!("{name}: {why}")),
        }
    }
    if problems.is_empty() {
        Ok(applied)
    } else {
        Err(ConfigProblems::from_list(problems))
    }
}

fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        return Err("empty path".to_owned());
    };
    if first.is_empty() {
        return Err("empty path segment".to_owned());
    }
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let child = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    set_in_value(child, rest, value)
}

fn set_in_value(node: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    match node {
        toml::Value::Table(t) => set_path(t, path, value),
        toml::Value::Array(items) => {
            let Some((first, rest)) = path.split_first() else {
                return Err("empty path".to_owned());
            };
            let index: usize = first
                .parse()
                .map_err(|_| format!("`{first}` is not an array index"))?;
            let len = items.len();
            let item = items
                .get_mut(index)
                .ok_or_else(|| format!("index {index} is out of range (array has {len})"))?;
            if rest.is_empty() {
                *item = value;
                Ok(())
            } else {
                set_in_value(item, rest, value)
            }
        }
        _ => Err("path goes through a value that is neither a table nor an array".to_owned()),
    }
}
