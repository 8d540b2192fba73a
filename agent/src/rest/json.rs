//! ZStack's JSON: the proto3 JSON of a message (pbjson: camelCase names, every field
//! present) reshaped as ZStack's REST API writes it. Two things differ, and both are
//! decided by the message's descriptor, never by guessing from a value:
//!
//! - 64-bit integers are JSON numbers (proto3 JSON writes them as strings);
//! - `google.protobuf.Timestamp` fields are ZStack's dates, `"Nov 14, 2017 10:20:57 PM"`
//!   (Java's default `DateFormat` as ZStack's Gson writes it), in UTC.
//!
//! Everything else (false and zero fields, empty lists, `null` for an absent message)
//! stays as proto3 JSON writes it.

use std::collections::HashMap;
use std::sync::LazyLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use serde_json::Value;

/// ZStack's date format (`MMM d, yyyy h:mm:ss a`).
pub const DATE_FORMAT: &str = "%b %-d, %Y %-I:%M:%S %p";

#[derive(Debug, Clone)]
enum Kind {
    Int64,
    Timestamp,
    Message(String),
    Other,
}

#[derive(Debug, Clone)]
struct Field {
    kind: Kind,
    repeated: bool,
}

/// Message full name (`.pkg.Msg`) -> JSON field name -> field.
type Schema = HashMap<String, HashMap<String, Field>>;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let mut schema = Schema::new();
    if let Ok(set) = prost_types::FileDescriptorSet::decode(vmbackup_proto::FILE_DESCRIPTOR_SET) {
        for file in &set.file {
            let package = file.package.clone().unwrap_or_default();
            for m in &file.message_type {
                add_message(&mut schema, &format!(".{package}"), m);
            }
        }
    }
    schema
});

fn add_message(schema: &mut Schema, scope: &str, m: &prost_types::DescriptorProto) {
    let name = format!("{scope}.{}", m.name());
    let mut fields = HashMap::new();
    for f in &m.field {
        let kind = match f.r#type() {
            Type::Int64 | Type::Uint64 | Type::Sint64 | Type::Fixed64 | Type::Sfixed64 => Kind::Int64,
            Type::Message if f.type_name() == ".google.protobuf.Timestamp" => Kind::Timestamp,
            Type::Message => Kind::Message(f.type_name().to_string()),
            _ => Kind::Other,
        };
        let json = f.json_name.clone().unwrap_or_else(|| camel(f.name()));
        fields.insert(json, Field { kind, repeated: f.label() == Label::Repeated });
    }
    for nested in &m.nested_type {
        add_message(schema, &name, nested);
    }
    schema.insert(name, fields);
}

fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The ZStack JSON of a message.
pub fn render<M: serde::Serialize + prost::Name>(message: &M) -> Value {
    let mut value = serde_json::to_value(message).unwrap_or(Value::Null);
    reshape(&mut value, &format!(".{}", M::full_name()));
    value
}

fn reshape(value: &mut Value, message: &str) {
    let (Some(fields), Value::Object(map)) = (SCHEMA.get(message), value) else {
        return;
    };
    for (key, v) in map.iter_mut() {
        let Some(field) = fields.get(key) else { continue };
        if field.repeated
            && let Value::Array(items) = v
        {
            items.iter_mut().for_each(|item| reshape_one(item, &field.kind));
        } else {
            reshape_one(v, &field.kind);
        }
    }
}

fn reshape_one(v: &mut Value, kind: &Kind) {
    match kind {
        Kind::Int64 => {
            if let Value::String(s) = v {
                if let Ok(n) = s.parse::<i64>() {
                    *v = Value::from(n);
                } else if let Ok(n) = s.parse::<u64>() {
                    *v = Value::from(n);
                }
            }
        }
        Kind::Timestamp => {
            if let Value::String(s) = v
                && let Ok(t) = chrono::DateTime::parse_from_rfc3339(s)
            {
                *v = Value::String(t.with_timezone(&chrono::Utc).format(DATE_FORMAT).to_string());
            }
        }
        Kind::Message(name) => reshape(v, name),
        Kind::Other => {}
    }
}

/// A ZStack date of Unix milliseconds.
pub fn date(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis).map(|t| t.format(DATE_FORMAT).to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbackup_proto::agent::v1 as pb;

    #[test]
    fn longs_are_numbers_and_dates_are_zstacks() {
        let reply = pb::VolumeBackupsReply {
            inventories: vec![pb::VolumeBackupInventory {
                uuid: "785edb93bb1b3a31857dac1e69cc8392".into(),
                size: 1_073_741_824,
                create_date: crate::api::timestamp(1_510_698_057_000),
                ..Default::default()
            }],
        };
        let v = render(&reply);
        let inv = &v["inventories"][0];
        assert_eq!(inv["size"], Value::from(1_073_741_824_i64));
        assert_eq!(inv["createDate"], Value::from("Nov 14, 2017 10:20:57 PM"));
        assert_eq!(inv["description"], Value::from(""));
        assert_eq!(inv["backupStorageRefs"], Value::Array(vec![]));
        assert_eq!(inv["lastOpDate"], Value::Null);
    }

    #[test]
    fn nested_and_repeated_messages_are_reshaped() {
        let reply = pb::QueryBackupStorageReply {
            inventories: vec![pb::BackupStorageInventory {
                total_capacity: 9_992_857_976_832,
                mons: vec![pb::CephBackupStorageMonInventory {
                    create_date: crate::api::timestamp(1_576_316_765_000),
                    mon_port: 6789,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            total: Some(1),
        };
        let v = render(&reply);
        assert_eq!(v["total"], Value::from(1));
        assert_eq!(v["inventories"][0]["totalCapacity"], Value::from(9_992_857_976_832_i64));
        assert_eq!(v["inventories"][0]["mons"][0]["createDate"], Value::from("Dec 14, 2019 9:46:05 AM"));
        assert_eq!(v["inventories"][0]["mons"][0]["monPort"], Value::from(6789));
        assert_eq!(date(0), "Jan 1, 1970 12:00:00 AM");
    }
}
