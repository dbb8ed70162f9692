//! OpenAI's attribute filters: a comparison (`{"type": "eq", "key": "k", "value": v}` with `eq`,
//! `ne`, `gt`, `gte`, `lt`, `lte`, `in`, `nin`) or a compound (`{"type": "and"|"or", "filters":
//! [...]}`), evaluated against a file's attributes (strings, numbers, booleans). A key the file
//! lacks matches only `ne` and `nin`. Order comparisons take two numbers or two strings.

use serde_json::{Map, Value};

use crate::RagError;

/// Deepest nesting of compound filters accepted.
const MAX_DEPTH: usize = 8;
/// Most comparisons in one filter.
const MAX_COMPARISONS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Nin,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    Compare { key: String, op: Op, value: Value },
    And(Vec<Filter>),
    Or(Vec<Filter>),
}

fn invalid(message: impl Into<String>) -> RagError {
    RagError::Invalid { param: "filters", message: message.into() }
}

impl Filter {
    pub fn parse(value: &Value) -> Result<Self, RagError> {
        let mut comparisons = 0;
        Self::parse_at(value, 0, &mut comparisons)
    }

    fn parse_at(value: &Value, depth: usize, comparisons: &mut usize) -> Result<Self, RagError> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!("`filters` nests deeper than {MAX_DEPTH} levels")));
        }
        let object =
            value.as_object().ok_or_else(|| invalid("each filter must be an object with a `type`"))?;
        let kind = object
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("a filter needs a string `type`"))?;
        let op = match kind {
            "and" | "or" => {
                let items = object
                    .get("filters")
                    .and_then(Value::as_array)
                    .ok_or_else(|| invalid(format!("an `{kind}` filter needs an array `filters`")))?;
                let parsed = items
                    .iter()
                    .map(|item| Self::parse_at(item, depth + 1, comparisons))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(if kind == "and" { Self::And(parsed) } else { Self::Or(parsed) });
            }
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "in" => Op::In,
            "nin" => Op::Nin,
            other => {
                return Err(invalid(format!(
                    "unknown filter type `{other}`; expected eq, ne, gt, gte, lt, lte, in, nin, and, or"
                )))
            }
        };
        *comparisons += 1;
        if *comparisons > MAX_COMPARISONS {
            return Err(invalid(format!("`filters` holds more than {MAX_COMPARISONS} comparisons")));
        }
        let key = object
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("a comparison needs a string `key`"))?;
        let value =
            object.get("value").ok_or_else(|| invalid(format!("comparison on `{key}` needs a `value`")))?;
        let scalar = |v: &Value| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_));
        let ok = match op {
            Op::In | Op::Nin => value.as_array().is_some_and(|items| items.iter().all(scalar)),
            Op::Gt | Op::Gte | Op::Lt | Op::Lte => matches!(value, Value::String(_) | Value::Number(_)),
            Op::Eq | Op::Ne => scalar(value),
        };
        if !ok {
            return Err(invalid(format!(
                "comparison `{kind}` on `{key}` needs {}",
                match op {
                    Op::In | Op::Nin => "an array of strings, numbers or booleans",
                    Op::Gt | Op::Gte | Op::Lt | Op::Lte => "a number or a string",
                    _ => "a string, number or boolean",
                }
            )));
        }
        Ok(Self::Compare { key: key.to_string(), op, value: value.clone() })
    }

    pub fn matches(&self, attributes: &Map<String, Value>) -> bool {
        match self {
            Self::And(all) => all.iter().all(|f| f.matches(attributes)),
            Self::Or(any) => any.iter().any(|f| f.matches(attributes)),
            Self::Compare { key, op, value } => {
                let Some(actual) = attributes.get(key) else { return matches!(op, Op::Ne | Op::Nin) };
                match op {
                    Op::Eq => same(actual, value),
                    Op::Ne => !same(actual, value),
                    Op::In => value.as_array().is_some_and(|items| items.iter().any(|v| same(actual, v))),
                    Op::Nin => !value.as_array().is_some_and(|items| items.iter().any(|v| same(actual, v))),
                    Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
                        let Some(order) = compare(actual, value) else { return false };
                        match op {
                            Op::Gt => order.is_gt(),
                            Op::Gte => order.is_ge(),
                            Op::Lt => order.is_lt(),
                            _ => order.is_le(),
                        }
                    }
                }
            }
        }
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Most attributes on one file, longest key and longest string value (OpenAI's limits).
pub const MAX_ATTRIBUTES: usize = 16;
pub const MAX_KEY_CHARS: usize = 64;
pub const MAX_STRING_CHARS: usize = 512;

/// Checks a file's `attributes`: an object of at most 16 keys whose values are strings (≤ 512
/// characters), numbers or booleans.
pub fn check_attributes(value: &Value) -> Result<Map<String, Value>, RagError> {
    let bad = |message: String| RagError::Invalid { param: "attributes", message };
    let map = match value {
        Value::Null => return Ok(Map::new()),
        Value::Object(map) => map,
        _ => return Err(bad("`attributes` must be an object".into())),
    };
    if map.len() > MAX_ATTRIBUTES {
        return Err(bad(format!(
            "`attributes` holds {} keys; at most {MAX_ATTRIBUTES} are allowed",
            map.len()
        )));
    }
    for (key, value) in map {
        if key.chars().count() > MAX_KEY_CHARS {
            return Err(bad(format!("attribute key `{key}` is longer than {MAX_KEY_CHARS} characters")));
        }
        match value {
            Value::String(s) if s.chars().count() > MAX_STRING_CHARS => {
                return Err(bad(format!("attribute `{key}` is longer than {MAX_STRING_CHARS} characters")))
            }
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
            _ => return Err(bad(format!("attribute `{key}` must be a string, a number or a boolean"))),
        }
    }
    Ok(map.clone())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn attrs(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn comparisons_and_compounds() {
        let a = attrs(json!({"author": "ada", "year": 2021, "draft": false}));
        let f = |v: Value| Filter::parse(&v).unwrap().matches(&a);
        assert!(f(json!({"type": "eq", "key": "author", "value": "ada"})));
        assert!(!f(json!({"type": "eq", "key": "author", "value": "bob"})));
        assert!(f(json!({"type": "eq", "key": "year", "value": 2021.0})));
        assert!(f(json!({"type": "gte", "key": "year", "value": 2021})));
        assert!(!f(json!({"type": "gt", "key": "year", "value": 2021})));
        assert!(f(json!({"type": "lt", "key": "author", "value": "b"})));
        assert!(
            !f(json!({"type": "lt", "key": "year", "value": "2030"})),
            "number against string never orders"
        );
        assert!(f(json!({"type": "in", "key": "author", "value": ["bob", "ada"]})));
        assert!(f(json!({"type": "nin", "key": "author", "value": ["bob"]})));
        assert!(f(json!({"type": "eq", "key": "draft", "value": false})));
        assert!(f(json!({"type": "ne", "key": "missing", "value": 1})));
        assert!(!f(json!({"type": "eq", "key": "missing", "value": 1})));
        assert!(f(json!({"type": "and", "filters": [
            {"type": "eq", "key": "author", "value": "ada"},
            {"type": "or", "filters": [{"type": "lt", "key": "year", "value": 2000}, {"type": "eq", "key": "draft", "value": false}]}
        ]})));
        assert!(!f(json!({"type": "or", "filters": []})));
        assert!(f(json!({"type": "and", "filters": []})));
    }

    #[test]
    fn malformed_filters_are_refused_with_the_reason() {
        for (filter, expected) in [
            (json!({"type": "like", "key": "a", "value": 1}), "unknown filter type"),
            (json!({"type": "eq", "value": 1}), "string `key`"),
            (json!({"type": "eq", "key": "a"}), "needs a `value`"),
            (json!({"type": "in", "key": "a", "value": 3}), "an array"),
            (json!({"type": "gt", "key": "a", "value": true}), "a number or a string"),
            (json!({"type": "and"}), "array `filters`"),
            (json!(["eq"]), "an object"),
        ] {
            let error = Filter::parse(&filter).unwrap_err();
            assert!(error.to_string().contains(expected), "{filter}: {error}");
        }
        let mut deep = json!({"type": "eq", "key": "a", "value": 1});
        for _ in 0..10 {
            deep = json!({"type": "and", "filters": [deep]});
        }
        assert!(Filter::parse(&deep).unwrap_err().to_string().contains("deeper"));
    }

    #[test]
    fn attributes_follow_openai_limits() {
        assert!(check_attributes(&json!({"a": "x", "n": 1, "b": true})).is_ok());
        assert!(check_attributes(&Value::Null).unwrap().is_empty());
        assert!(check_attributes(&json!({"a": [1]})).is_err());
        assert!(check_attributes(&json!({"a": "x".repeat(513)})).is_err());
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!(i))).collect();
        assert!(check_attributes(&Value::Object(many)).is_err());
    }
}
