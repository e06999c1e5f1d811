//! Server-side `Table` output (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`),
//! which is how `kubectl get` shows a CRD's printer columns.

use serde_json::{json, Value};

use super::resources::{Column, Resource};

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0].b`, escaped dots
/// (`.capacity.nvidia\.com/gpu`) and one filter `[?(@.k=="v")]` per step.
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    let mut rest = path.strip_prefix('.').unwrap_or(path);
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            let inner = &after[..end];
            rest = after[end + 1..]
                .strip_prefix('.')
                .unwrap_or(&after[end + 1..]);
            let items = cur.as_array()?;
            cur = if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')'))
            {
                let (key, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches(|c| c == '"' || c == '\'');
                items
                    .iter()
                    .find(|i| json_path(i, key.trim()).and_then(Value::as_str) == Some(want))?
            } else {
                items.get(inner.parse::<usize>().ok()?)?
            };
            continue;
        }
        // A key runs to the next unescaped '.' or '['.
        let mut key = String::new();
        let mut chars = rest.char_indices().peekable();
        let mut consumed = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        key.push(n);
                    }
                }
                '.' | '[' => {
                    consumed = i;
                    break;
                }
                _ => key.push(c),
            }
        }
        cur = cur.get(&key)?;
        rest = &rest[consumed..];
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Some(cur)
}

/// "5s", "3m", "2h", "4d", as kubectl prints ages.
pub fn human_age(since: &str, now: jiff::Timestamp) -> String {
    let Ok(t) = since.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let s = (now.as_second() - t.as_second()).max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Columns computed the way kubectl's built-in printers compute them.
fn computed(obj: &Value, name: &str) -> Value {
    let status = &obj["status"];
    match name {
        "@podReady" => {
            let cs = status["containerStatuses"].as_array();
            let ready = cs.map_or(0, |c| {
                c.iter()
                    .filter(|s| s["ready"].as_bool() == Some(true))
                    .count()
            });
            let total = obj["spec"]["containers"].as_array().map_or(0, Vec::len);
            json!(format!("{ready}/{total}"))
        }
        "@podStatus" => {
            if obj["metadata"].get("deletionTimestamp").is_some() {
                return json!("Terminating");
            }
            let waiting = status["containerStatuses"].as_array().and_then(|c| {
                c.iter()
                    .find_map(|s| s["state"]["waiting"]["reason"].as_str())
            });
            json!(waiting.or(status["phase"].as_str()).unwrap_or("Pending"))
        }
        "@podRestarts" => json!(status["containerStatuses"].as_array().map_or(0, |c| c
            .iter()
            .map(|s| s["restartCount"].as_i64().unwrap_or(0))
            .sum::<i64>())),
        "@nodeStatus" => {
            let ready = status["conditions"].as_array().and_then(|c| {
                c.iter()
                    .find(|c| c["type"] == "Ready")
                    .map(|c| c["status"] == "True")
            });
            let mut s = if ready == Some(true) {
                "Ready".to_string()
            } else {
                "NotReady".to_string()
            };
            if obj["spec"]["unschedulable"].as_bool() == Some(true) {
                s.push_str(",SchedulingDisabled");
            }
            json!(s)
        }
        // kubectl's printer: allocated and/or reserved, else pending.
        "@claimState" => {
            let mut parts = Vec::new();
            if obj["metadata"].get("deletionTimestamp").is_some() {
                parts.push("deleted");
            }
            if status.get("allocation").is_some_and(|a| !a.is_null()) {
                parts.push("allocated");
            }
            if status["reservedFor"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                parts.push("reserved");
            }
            json!(if parts.is_empty() {
                "pending".to_string()
            } else {
                parts.join(",")
            })
        }
        "@servicePorts" => json!(obj["spec"]["ports"]
            .as_array()
            .map(|p| p
                .iter()
                .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
                .collect::<Vec<_>>()
                .join(","))
            .unwrap_or_default()),
        "@eventObject" => {
            let r = if obj.get("regarding").is_some() {
                &obj["regarding"]
            } else {
                &obj["involvedObject"]
            };
            json!(format!(
                "{}/{}",
                r["kind"].as_str().unwrap_or("").to_lowercase(),
                r["name"].as_str().unwrap_or("")
            ))
        }
        "@eventMessage" => obj
            .get("note")
            .or(obj.get("message"))
            .cloned()
            .unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn cell(obj: &Value, c: &Column, now: jiff::Timestamp) -> Value {
    let v = if c.path.starts_with('@') {
        computed(obj, &c.path)
    } else {
        json_path(obj, &c.path).cloned().unwrap_or(Value::Null)
    };
    match (&v, c.kind.as_str()) {
        (Value::String(s), "date") => json!(human_age(s, now)),
        (Value::Null, _) => json!("<none>"),
        _ => v,
    }
}

/// The column definitions: Name, then the resource's columns.
fn definitions(r: &Resource) -> Vec<Value> {
    let mut out = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0})];
    out.extend(r.columns.iter().map(|c| {
        let (kind, format) = match c.kind.as_str() {
            "date" => ("string", "date"),
            k => (k, ""),
        };
        json!({"name": c.name, "type": kind, "format": format, "description": c.description,
               "priority": c.priority})
    }));
    out
}

/// A row: the cells and the object's metadata (`includeObject=Metadata`).
fn row(r: &Resource, obj: &Value, now: jiff::Timestamp) -> Value {
    let mut cells = vec![obj["metadata"]["name"].clone()];
    cells.extend(r.columns.iter().map(|c| cell(obj, c, now)));
    json!({
        "cells": cells,
        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                   "metadata": obj["metadata"]},
    })
}

/// The Table of `objects`.
pub fn table(r: &Resource, objects: &[Value], resource_version: u64) -> Value {
    let now = jiff::Timestamp::now();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": definitions(r),
        "rows": objects.iter().map(|o| row(r, o, now)).collect::<Vec<_>>(),
    })
}

/// Whether the client asked for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_of_printer_columns() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"},
                                                  {"type": "Ready", "status": "True"}],
                                   "capacity": {"nvidia.com/gpu": "4"}},
                       "items": [{"n": 1}, {"n": 2}]});
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(
            json_path(&o, ".status.capacity.nvidia\\.com/gpu"),
            Some(&json!("4"))
        );
        assert_eq!(json_path(&o, ".items[1].n"), Some(&json!(2)));
        assert_eq!(json_path(&o, ".status.missing"), None);
    }

    #[test]
    fn ages_print_as_kubectl_does() {
        let now: jiff::Timestamp = "2026-01-01T12:00:00Z".parse().unwrap();
        assert_eq!(human_age("2026-01-01T11:59:15Z", now), "45s");
        assert_eq!(human_age("2026-01-01T11:50:00Z", now), "10m");
        assert_eq!(human_age("2025-12-30T12:00:00Z", now), "2d");
    }
}
