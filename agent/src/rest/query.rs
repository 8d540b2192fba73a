//! ZStack's query string: `q=field<op>value` (repeatable, the catalog's operators),
//! `limit`, `start`, `count`, `sort=+field|-field`, `replyWithCount` and `fields`, and the
//! `GET .../{uuid}` form, which is `q=uuid=<uuid>`. The conditions themselves are checked
//! by the catalog, the same as over gRPC.

use serde_json::{Map, Value};

use crate::error::{AgentError, Result};

/// A query's request JSON (the proto's field names), and the `fields` to keep in each
/// inventory (all when empty).
pub fn request(query: &[(String, String)], uuid: Option<&str>) -> Result<(Value, Vec<String>)> {
    let mut conditions = Vec::new();
    let mut out = Map::new();
    let mut fields = Vec::new();
    if let Some(u) = uuid {
        conditions.push(Value::String(format!("uuid={u}")));
    }
    for (k, v) in query {
        match k.as_str() {
            "q" => conditions.push(Value::String(v.clone())),
            "limit" | "start" => {
                let n: i32 = v.parse().map_err(|_| AgentError::invalid(field(k), format!("{v:?} is not a number")))?;
                out.insert(k.clone(), Value::from(n));
            }
            "count" | "replyWithCount" => {
                let b = match v.as_str() {
                    "true" | "" => true,
                    "false" => false,
                    _ => return Err(AgentError::invalid(field(k), format!("{v:?} is not true or false"))),
                };
                out.insert(k.clone(), Value::Bool(b));
            }
            "sort" => {
                let (dir, name) = match v.as_bytes().first() {
                    Some(b'+') => ("asc", &v[1..]),
                    Some(b'-') => ("desc", &v[1..]),
                    // `+` arrives as a space when the client did not escape it.
                    Some(b' ') => ("asc", &v[1..]),
                    _ => ("asc", v.as_str()),
                };
                out.insert("sortBy".into(), Value::String(name.to_string()));
                out.insert("sortDirection".into(), Value::String(dir.into()));
            }
            "fields" => fields.extend(v.split(',').filter(|f| !f.is_empty()).map(str::to_string)),
            other => return Err(AgentError::invalid("query", format!("unknown query parameter {other:?}"))),
        }
    }
    out.insert("conditions".into(), Value::Array(conditions));
    Ok((Value::Object(out), fields))
}

fn field(k: &str) -> &'static str {
    match k {
        "limit" => "limit",
        "start" => "start",
        "count" => "count",
        _ => "replyWithCount",
    }
}

/// The reply as ZStack's queries answer: `inventories` (only `fields` of each, when
/// named), `total` when counted, and `"success": true`.
pub fn reply(mut v: Value, fields: &[String]) -> Value {
    if let Value::Object(m) = &mut v {
        if !fields.is_empty()
            && let Some(Value::Array(items)) = m.get_mut("inventories")
        {
            for item in items {
                if let Value::Object(inv) = item {
                    inv.retain(|k, _| fields.iter().any(|f| f == k));
                }
            }
        }
        if m.get("total").is_some_and(Value::is_null) {
            m.remove("total");
        }
        m.insert("success".into(), Value::Bool(true));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn the_query_string_becomes_the_query_request() {
        let (v, fields) = request(
            &q(&[("q", "name=a"), ("q", "size>5"), ("limit", "3"), ("sort", "-createDate"), ("fields", "uuid,name")]),
            None,
        )
        .expect("query");
        assert_eq!(v["conditions"], serde_json::json!(["name=a", "size>5"]));
        assert_eq!(v["limit"], 3);
        assert_eq!(v["sortBy"], "createDate");
        assert_eq!(v["sortDirection"], "desc");
        assert_eq!(fields, ["uuid", "name"]);
        let (v, _) = request(&[], Some("abc")).expect("by uuid");
        assert_eq!(v["conditions"], serde_json::json!(["uuid=abc"]));
        assert!(request(&q(&[("limit", "x")]), None).is_err());
        assert!(request(&q(&[("nope", "1")]), None).is_err());
    }

    #[test]
    fn replies_keep_the_named_fields_and_say_success() {
        let v = serde_json::json!({"inventories": [{"uuid": "u", "name": "n", "size": 1}], "total": null});
        let r = reply(v, &["uuid".into()]);
        assert_eq!(r, serde_json::json!({"inventories": [{"uuid": "u"}], "success": true}));
    }
}
