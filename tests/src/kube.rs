//! Kubernetes YAML in tests: a stream's documents as JSON values, and typed round
//! trips that prove every field is one the Kubernetes API types know.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The non-empty documents of a YAML stream, as JSON values.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML maps to JSON"))
        .collect()
}

/// Deserialises `object` as `T` (e.g. a k8s-openapi `Deployment`), serialises it
/// back, and panics naming the first field that did not survive: a misspelt or
/// mistyped field is dropped or changed by the trip. The typed side may add
/// fields (such as `kind` on embedded claims), never lose one.
pub fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> T {
    let typed: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("not a valid {}: {e}", std::any::type_name::<T>()));
    let back = serde_json::to_value(&typed).expect("serialise");
    if let Err(path) = kept(object, &back, String::new()) {
        panic!(
            "{path} is lost or changed in a round trip through {}",
            std::any::type_name::<T>()
        );
    }
    typed
}

fn kept(original: &Value, back: &Value, path: String) -> Result<(), String> {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => a.iter().try_for_each(|(key, value)| {
            let path = format!("{path}.{key}");
            match b.get(key) {
                Some(other) => kept(value, other, path),
                None => Err(path),
            }
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .try_for_each(|(i, (x, y))| kept(x, y, format!("{path}[{i}]"))),
        _ if original == back => Ok(()),
        _ => Err(path),
    }
}
