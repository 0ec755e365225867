//! The QMP message layer: what vublk's control socket says and accepts, spelled as QEMU spells
//! it, so existing clients (the `qemu.qmp` library, libvirt's monitor code) drive vublk as they
//! drive QEMU (docs/interop/qmp-spec.rst).
//!
//! It owns: the greeting; turning one framed JSON value into a [`Command`] with QEMU's checks,
//! in QEMU's order and with QEMU's texts (qapi/qmp-dispatch.c, monitor/qmp.c); error classes;
//! reply and event builders; argument checking with the messages of QEMU's QObject input
//! visitor ([`Args`]); and the wire spelling ([`to_line`]): members in QEMU's order, `": "` and
//! `", "` separators, non-ASCII escaped, one message per line ended by `"\r\n"`.
//!
//! It does not know which commands exist or what they do, the session's negotiation state
//! (callers pass it in), framing (`framing.rs`), sockets, fds or threads.
//!
//! QEMU 10.0's replies, captured from `qemu-storage-daemon` 10.0.2 over a unix socket monitor
//! (python3 socket client), are the expected strings of this module's tests. Where vublk
//! departs from them it says so beside the code: JSON syntax errors carry serde_json's wording
//! after QEMU's `"JSON parse error, "` prefix, and no capability (`oob`) is ever offered.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::{json, Map, Number, Value};

use super::framing::FrameError;

/// QEMU's error classes (qapi/error.json `QapiErrorClass`), serialized as QEMU spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// A QMP error: the `{"class", "desc"}` of an error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of almost every QEMU error.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    /// An unknown command, after negotiation (qapi/qmp-dispatch.c).
    pub fn command_not_found(name: &str) -> Self {
        QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// Any command but `qmp_capabilities` before negotiation (monitor/qmp.c rewrites the
    /// `CommandNotFound` desc to this).
    pub fn capabilities_expected() -> Self {
        QmpError::new(
            ErrorClass::CommandNotFound,
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        )
    }

    /// `qmp_capabilities` after negotiation (monitor/qmp-cmds-control.c).
    pub fn capabilities_already_negotiated() -> Self {
        QmpError::new(
            ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        )
    }

    /// The `{"class", "desc"}` object.
    pub fn to_value(&self) -> Value {
        json!({ "class": self.class.as_str(), "desc": self.desc })
    }
}

/// A well-formed QMP command.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// The `execute` member.
    pub name: String,
    /// The `arguments` member; empty when absent.
    pub arguments: Map<String, Value>,
    /// The `id` member, to echo unchanged in the reply.
    pub id: Option<Value>,
}

/// Input that is not a well-formed command, with the `id` to echo when there was one.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("QMP input rejected")]
pub struct CommandError {
    pub id: Option<Value>,
    #[source]
    pub error: QmpError,
}

impl CommandError {
    /// The error reply to send.
    pub fn reply(&self) -> Value {
        error(self.id.clone(), self.error.clone())
    }
}

/// The error reply to a stretch of input the splitter rejected.
pub fn frame_error_reply(frame: &FrameError) -> Value {
    CommandError::from(frame.clone()).reply()
}

impl From<FrameError> for CommandError {
    /// A stretch of input the splitter rejected: QEMU replies without an `id`, having none.
    fn from(frame: FrameError) -> Self {
        CommandError {
            id: None,
            error: QmpError::generic(frame.to_string()),
        }
    }
}

/// Parses one framed JSON value into a [`Command`], checking as QEMU's `qmp_dispatch` does:
/// valid JSON (duplicate keys refused, as QEMU's parser refuses them), an object, then each
/// member in QEMU's iteration order (`execute` a string, `arguments` an object, `id` anything,
/// nothing else), then `execute` present. `exec-oob` is unexpected: vublk offers no `oob`
/// capability, and QEMU treats it the same way on a monitor that did not enable it.
pub fn parse_command(bytes: &[u8]) -> Result<Command, CommandError> {
    let reject = |id: Option<Value>, desc: String| CommandError {
        id,
        error: QmpError::generic(desc),
    };
    let value = match serde_json::from_slice::<StrictValue>(bytes) {
        Ok(StrictValue(value)) => value,
        Err(e) => return Err(reject(None, format!("JSON parse error, {e}"))),
    };
    let Value::Object(mut members) = value else {
        return Err(reject(None, "QMP input must be a JSON object".into()));
    };
    let id = members.get("id").cloned();
    for (key, value) in qdict_order(&members) {
        match (key, value) {
            ("execute", Value::String(_)) | ("arguments", Value::Object(_)) | ("id", _) => {}
            ("execute", _) => {
                return Err(reject(
                    id,
                    "QMP input member 'execute' must be a string".into(),
                ))
            }
            ("arguments", _) => {
                return Err(reject(
                    id,
                    "QMP input member 'arguments' must be an object".into(),
                ))
            }
            (other, _) => {
                return Err(reject(
                    id,
                    format!("QMP input member '{other}' is unexpected"),
                ))
            }
        }
    }
    let Some(Value::String(name)) = members.remove("execute") else {
        return Err(reject(id, "QMP input lacks member 'execute'".into()));
    };
    let arguments = match members.remove("arguments") {
        Some(Value::Object(arguments)) => arguments,
        _ => Map::new(),
    };
    Ok(Command {
        name,
        arguments,
        id,
    })
}

/// Checks a `qmp_capabilities` command as QEMU does: its arguments (`enable`: an optional list
/// of `QMPCapability`, whose one value is `oob`), then that negotiation is not already done,
/// then that every capability asked for was offered (none ever is). `Ok` means negotiation is
/// now complete and the reply is `{"return": {}}`.
pub fn qmp_capabilities(arguments: &Map<String, Value>, negotiated: bool) -> Result<(), QmpError> {
    /// QEMU's `QMPCapability` enum.
    const CAPABILITIES: &[&str] = &["oob"];
    let mut args = Args::new(arguments);
    let mut asked = Vec::new();
    for (index, element) in args
        .opt_array("enable")?
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let name = format!("enable[{index}]");
        // QEMU 10.0 names an enum list element 'null' in this message; vublk names it.
        asked.push(args.element_enum(&name, element, CAPABILITIES)?);
    }
    args.finish()?;
    if negotiated {
        return Err(QmpError::capabilities_already_negotiated());
    }
    if !asked.is_empty() {
        let unavailable = asked.join(", ");
        return Err(QmpError::generic(format!(
            "Capability {unavailable} not available"
        )));
    }
    Ok(())
}

/// The `query-version` return value: `{"qemu": {"major", "minor", "micro"}, "package"}`.
pub fn version_info(version: (u32, u32, u32), package: &str) -> Value {
    let (major, minor, micro) = version;
    json!({
        "qemu": { "major": major, "minor": minor, "micro": micro },
        "package": package,
    })
}

/// The greeting sent when a client connects. It advertises no capabilities: the `qemu.qmp`
/// library turns on out-of-band mode when it sees `oob`.
pub fn greeting(version: (u32, u32, u32), package: &str) -> Value {
    json!({ "QMP": { "version": version_info(version, package), "capabilities": [] } })
}

/// A success reply, `{"return": ret, "id": id}` (no `id` member when the command had none).
pub fn success(id: Option<Value>, ret: Value) -> Value {
    let mut reply = Map::new();
    reply.insert("return".into(), ret);
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// An error reply, `{"id": id, "error": {"class", "desc"}}`.
pub fn error(id: Option<Value>, error: QmpError) -> Value {
    let mut reply = Map::new();
    reply.insert("error".into(), error.to_value());
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// An event, `{"timestamp": {"seconds", "microseconds"}, "event": name, "data": data}`
/// (qapi/qmp-event.c). Events without data have no `data` member, as QEMU's generated emitters
/// omit it. A time before 1970 gives negative fields, as QEMU's signed division would.
pub fn event(name: &str, data: Option<Value>, now: SystemTime) -> Value {
    let (seconds, microseconds) = match now.duration_since(UNIX_EPOCH) {
        Ok(after) => (
            i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            i64::from(after.subsec_micros()),
        ),
        Err(before) => {
            let before = before.duration();
            (
                -i64::try_from(before.as_secs()).unwrap_or(i64::MAX),
                -i64::from(before.subsec_micros()),
            )
        }
    };
    let mut message = Map::new();
    message.insert("event".into(), Value::String(name.into()));
    message.insert(
        "timestamp".into(),
        json!({ "seconds": seconds, "microseconds": microseconds }),
    );
    if let Some(data) = data {
        message.insert("data".into(), data);
    }
    Value::Object(message)
}

/// One message as QEMU writes it (qobject/json-writer.c, monitor output): object members in
/// QEMU's order (see [`qdict_order`]), `": "` after keys and `", "` between items, strings
/// escaped to ASCII, and `"\r\n"` at the end (QEMU writes `\n`, its monitor turns it into
/// `\r\n`). Recursion follows the value's depth, which framing bounds for anything a client
/// supplied (`id`) and vublk bounds for what it builds.
pub fn to_line(message: &Value) -> Vec<u8> {
    let mut line = String::new();
    write_value(&mut line, message);
    line.push_str("\r\n");
    line.into_bytes()
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(members) => {
            out.push('{');
            for (i, (key, member)) in qdict_order(members).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, key);
                out.push_str(": ");
                write_value(out, member);
            }
            out.push('}');
        }
    }
}

/// QEMU's `quoted_str`: the usual short escapes, every other control character and everything
/// from DEL up as `\uXXXX` (upper-case hex, UTF-16 surrogate pairs beyond the BMP).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
}

/// QEMU's QDict bucket for a member name: `tdb_hash(name) % QDICT_BUCKET_MAX`
/// (qobject/qdict.c). QEMU iterates a dict bucket by bucket, so this decides both the order
/// members go on the wire and which of several bad members `qmp_dispatch` reports.
fn qdict_bucket(name: &str) -> u32 {
    /// qobject/qdict.h `QDICT_BUCKET_MAX`.
    const QDICT_BUCKET_MAX: u32 = 512;
    // C's `unsigned` arithmetic: everything wraps at 2^32, the length included.
    let len = u32::try_from(name.len() & 0xffff_ffff).unwrap_or(0);
    let mut value = 0x238F_13AF_u32.wrapping_mul(len);
    let mut shift = 0u32;
    for &byte in name.as_bytes() {
        value = value.wrapping_add(u32::from(byte) << shift);
        shift = (shift + 5) % 24;
    }
    1_103_515_243_u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKET_MAX
}

/// Member names in QEMU's iteration order. Within one bucket QEMU goes newest insertion first,
/// which a `serde_json::Map` does not record; names break the tie (real collisions are rare:
/// `minor`/`micro` is one, and comes out as QEMU writes it).
fn qdict_order(members: &Map<String, Value>) -> Vec<(&str, &Value)> {
    let mut ordered: Vec<(&str, &Value)> = members.iter().map(|(k, v)| (k.as_str(), v)).collect();
    ordered.sort_by_key(|(key, _)| (qdict_bucket(key), *key));
    ordered
}

/// A JSON value parsed with duplicate object keys refused at every level (QEMU: "JSON parse
/// error, duplicate key"); serde_json's own `Value` would keep the last silently, so a
/// command could mean one thing to the manager's JSON library and another to vublk.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<StrictValue, E> {
        Number::from_f64(v)
            .map(|n| StrictValue(Value::Number(n)))
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(StrictValue(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key '{key}'")));
            }
            let StrictValue(value) = map.next_value()?;
            members.insert(key, value);
        }
        Ok(StrictValue(Value::Object(members)))
    }
}

/// Checks a command's arguments as QEMU's QObject input visitor does, with its messages.
///
/// Read the members in the command's schema order (the order QEMU visits them, so the first
/// error reported is the one QEMU reports), then call [`finish`](Self::finish), which refuses
/// members nobody read. JSON `null` is a value of the wrong type, never "absent", as in QEMU.
/// A nested object ([`req_object`](Self::req_object), [`opt_object_array`](Self::opt_object_array))
/// is an `Args` of its own, to finish before reading the next outer member; its errors name the
/// full path (`backing[0].format`) as QEMU's do. All errors are `GenericError`s.
#[derive(Debug)]
pub struct Args<'a> {
    arguments: &'a Map<String, Value>,
    /// Path of this object from the top (`""`, `backing[0]`), for messages.
    prefix: String,
    /// Members read so far.
    visited: BTreeSet<&'a str>,
}

impl<'a> Args<'a> {
    /// A command's `arguments`.
    pub fn new(arguments: &'a Map<String, Value>) -> Self {
        Args::nested(arguments, String::new())
    }

    /// An object found at `path` inside a command's arguments.
    pub fn nested(arguments: &'a Map<String, Value>, path: String) -> Self {
        Args {
            arguments,
            prefix: path,
            visited: BTreeSet::new(),
        }
    }

    /// The full name of a member, as QEMU's `full_name` spells it.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// QEMU's `QERR_INVALID_PARAMETER_VALUE`, for checks the caller makes on a value it read:
    /// `Parameter 'size' expects a >0 size`.
    #[cfg_attr(
        not(test),
        allow(
            dead_code,
            reason = "a QAPI member kind no command takes yet; kept with its tests"
        )
    )]
    pub fn invalid_value(&self, name: &str, expects: &str) -> QmpError {
        QmpError::generic(format!(
            "Parameter '{}' expects {expects}",
            self.full_name(name)
        ))
    }

    fn missing(&self, name: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{}' is missing", self.full_name(name)))
    }

    fn wrong_type(&self, name: &str, expected: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.full_name(name)
        ))
    }

    /// The member `name`, marked as read.
    fn get(&mut self, name: &str) -> Option<&'a Value> {
        let (key, value) = self.arguments.get_key_value(name)?;
        self.visited.insert(key.as_str());
        Some(value)
    }

    /// Reads an optional member with `convert`, which returns `None` for a wrong type.
    fn opt_with<T>(
        &mut self,
        name: &str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
        wrong_type: impl FnOnce(&Self) -> QmpError,
    ) -> Result<Option<T>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => match convert(value) {
                Some(converted) => Ok(Some(converted)),
                None => Err(wrong_type(self)),
            },
        }
    }

    /// An optional `str`: "Invalid parameter type for 'x', expected: string".
    pub fn opt_str(&mut self, name: &str) -> Result<Option<&'a str>, QmpError> {
        self.opt_with(name, Value::as_str, |a| a.wrong_type(name, "string"))
    }

    /// A required `str`: "Parameter 'x' is missing".
    pub fn req_str(&mut self, name: &str) -> Result<&'a str, QmpError> {
        self.opt_str(name)?.ok_or_else(|| self.missing(name))
    }

    /// An optional `bool`: "Invalid parameter type for 'x', expected: boolean".
    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        self.opt_with(name, Value::as_bool, |a| a.wrong_type(name, "boolean"))
    }

    /// An optional `int` (QAPI's int64, the type of `fdset-id`, `fd` and `size` in the
    /// commands vublk copies): fractions and out-of-range numbers are wrong types too, as in
    /// QEMU: "Invalid parameter type for 'x', expected: integer".
    pub fn opt_i64(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        self.opt_with(name, Value::as_i64, |a| a.wrong_type(name, "integer"))
    }

    pub fn req_i64(&mut self, name: &str) -> Result<i64, QmpError> {
        self.opt_i64(name)?.ok_or_else(|| self.missing(name))
    }

    /// An optional `uint64`: "Parameter 'x' expects uint64". QEMU also accepts a negative
    /// number here and wraps it ("for backward compatibility"); vublk refuses it with the same
    /// message rather than turn -1 into 2^64-1.
    #[cfg_attr(
        not(test),
        allow(
            dead_code,
            reason = "a QAPI member kind no command takes yet; kept with its tests"
        )
    )]
    pub fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, QmpError> {
        self.opt_with(name, Value::as_u64, |a| a.invalid_value(name, "uint64"))
    }

    /// An optional enum member, one of `allowed`: "Invalid parameter type for 'x', expected:
    /// string", or "Parameter 'x' does not accept value 'v'".
    pub fn opt_enum(
        &mut self,
        name: &str,
        allowed: &[&'static str],
    ) -> Result<Option<&'static str>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => self.element_enum(name, value, allowed).map(Some),
        }
    }

    #[cfg_attr(
        not(test),
        allow(
            dead_code,
            reason = "a QAPI member kind no command takes yet; kept with its tests"
        )
    )]
    pub fn req_enum(
        &mut self,
        name: &str,
        allowed: &[&'static str],
    ) -> Result<&'static str, QmpError> {
        self.opt_enum(name, allowed)?
            .ok_or_else(|| self.missing(name))
    }

    /// Checks `value`, found at `name` (a member or a list element such as `enable[0]`),
    /// against an enum's values.
    pub fn element_enum(
        &self,
        name: &str,
        value: &Value,
        allowed: &[&'static str],
    ) -> Result<&'static str, QmpError> {
        let text = value
            .as_str()
            .ok_or_else(|| self.wrong_type(name, "string"))?;
        allowed.iter().copied().find(|a| *a == text).ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter '{}' does not accept value '{text}'",
                self.full_name(name)
            ))
        })
    }

    /// An optional list: "Invalid parameter type for 'x', expected: array".
    pub fn opt_array(&mut self, name: &str) -> Result<Option<&'a [Value]>, QmpError> {
        self.opt_with(
            name,
            |v| v.as_array().map(Vec::as_slice),
            |a| a.wrong_type(name, "array"),
        )
    }

    /// An optional object, as an `Args` of its own: "Invalid parameter type for 'x',
    /// expected: object".
    #[cfg_attr(
        not(test),
        allow(
            dead_code,
            reason = "a QAPI member kind no command takes yet; kept with its tests"
        )
    )]
    pub fn opt_object(&mut self, name: &str) -> Result<Option<Args<'a>>, QmpError> {
        let path = self.full_name(name);
        let object = self.opt_with(name, Value::as_object, |a| a.wrong_type(name, "object"))?;
        Ok(object.map(|members| Args::nested(members, path)))
    }

    #[cfg_attr(
        not(test),
        allow(
            dead_code,
            reason = "a QAPI member kind no command takes yet; kept with its tests"
        )
    )]
    pub fn req_object(&mut self, name: &str) -> Result<Args<'a>, QmpError> {
        self.opt_object(name)?.ok_or_else(|| self.missing(name))
    }

    /// An optional list of objects, each an `Args` of its own named `x[i]`: "Invalid
    /// parameter type for 'x[1]', expected: object".
    pub fn opt_object_array(&mut self, name: &str) -> Result<Option<Vec<Args<'a>>>, QmpError> {
        let Some(items) = self.opt_array(name)? else {
            return Ok(None);
        };
        let mut objects = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let element = format!("{name}[{index}]");
            let members = item
                .as_object()
                .ok_or_else(|| self.wrong_type(&element, "object"))?;
            objects.push(Args::nested(members, self.full_name(&element)));
        }
        Ok(Some(objects))
    }

    /// Refuses members nobody read: "Parameter 'x' is unexpected". QEMU names the first in
    /// its hash table's order when there are several; vublk the first in QDict order.
    pub fn finish(self) -> Result<(), QmpError> {
        match qdict_order(self.arguments)
            .into_iter()
            .find(|(key, _)| !self.visited.contains(key))
        {
            Some((key, _)) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.full_name(key)
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse_error(input: &str) -> (Option<Value>, QmpError) {
        let e = parse_command(input.as_bytes()).unwrap_err();
        (e.id, e.error)
    }

    /// `to_line`, as text.
    fn line(message: &Value) -> String {
        String::from_utf8(to_line(message)).unwrap()
    }

    fn generic(desc: &str) -> QmpError {
        QmpError::generic(desc)
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    // --- parse_command: every path, with the text qemu-storage-daemon 10.0.2 replied ---

    #[test]
    fn a_command_keeps_its_name_arguments_and_id() {
        let cmd = parse_command(
            br#"{"execute":"add-fd","arguments":{"opaque":"x"},"id":[1,{"a":null}]}"#,
        );

        assert_eq!(
            cmd,
            Ok(Command {
                name: "add-fd".into(),
                arguments: object(json!({"opaque": "x"})),
                id: Some(json!([1, {"a": null}])),
            })
        );
    }

    #[test]
    fn missing_arguments_are_an_empty_object_and_missing_id_is_none() {
        let cmd = parse_command(br#"{"execute":"query-block"}"#).unwrap();

        assert_eq!((cmd.arguments, cmd.id), (Map::new(), None));
    }

    #[test]
    fn non_object_input_is_refused_without_id() {
        let got: Vec<_> = ["[1]", "1", "\"x\"", "true", "null"]
            .iter()
            .map(|i| parse_error(i))
            .collect();

        assert!(got
            .iter()
            .all(|e| *e == (None, generic("QMP input must be a JSON object"))));
    }

    #[test]
    fn a_command_without_execute_is_refused() {
        assert_eq!(
            parse_error("{}"),
            (None, generic("QMP input lacks member 'execute'"))
        );
    }

    #[test]
    fn execute_must_be_a_string() {
        assert_eq!(
            parse_error(r#"{"execute":1}"#),
            (None, generic("QMP input member 'execute' must be a string"))
        );
    }

    #[test]
    fn an_unknown_top_level_member_is_refused_and_the_id_echoed() {
        assert_eq!(
            parse_error(r#"{"id":1,"foo":2,"execute":"quit"}"#),
            (
                Some(json!(1)),
                generic("QMP input member 'foo' is unexpected")
            )
        );
    }

    #[test]
    fn arguments_must_be_an_object_even_when_null() {
        let got = [
            parse_error(r#"{"execute":"q","arguments":1}"#),
            parse_error(r#"{"execute":"q","arguments":[]}"#),
            parse_error(r#"{"execute":"q","arguments":null,"id":3}"#),
        ];

        let desc = generic("QMP input member 'arguments' must be an object");
        assert_eq!(
            got,
            [
                (None, desc.clone()),
                (None, desc.clone()),
                (Some(json!(3)), desc)
            ]
        );
    }

    #[test]
    fn exec_oob_is_unexpected_because_oob_is_never_offered() {
        let got = [
            parse_error(r#"{"exec-oob":"query-version","id":5}"#),
            parse_error(r#"{"exec-oob":"query-version","execute":"query-version"}"#),
        ];

        let desc = generic("QMP input member 'exec-oob' is unexpected");
        assert_eq!(got, [(Some(json!(5)), desc.clone()), (None, desc)]);
    }

    #[test]
    fn several_bad_members_are_reported_in_qemus_order() {
        // QEMU's QDict puts "a" before "execute", "execute" before "arguments" and "foo".
        let got = [
            parse_error(r#"{"execute":1,"a":1}"#),
            parse_error(r#"{"foo":1,"execute":1}"#),
            parse_error(r#"{"arguments":2,"execute":1}"#),
            parse_error(r#"{"arguments":2,"x":1}"#),
            parse_error(r#"{"x":1}"#),
        ];

        assert_eq!(
            got.map(|(_, e)| e.desc),
            [
                "QMP input member 'a' is unexpected",
                "QMP input member 'execute' must be a string",
                "QMP input member 'execute' must be a string",
                "QMP input member 'x' is unexpected",
                "QMP input member 'x' is unexpected",
            ]
        );
    }

    #[test]
    fn a_syntax_error_is_a_json_parse_error_without_id() {
        let (id, e) = parse_error(r#"{"execute":}"#);

        assert_eq!((id, e.class), (None, ErrorClass::GenericError));
        assert!(e.desc.starts_with("JSON parse error, "), "{}", e.desc);
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let top = parse_error(r#"{"execute":"quit","execute":"query-version"}"#)
            .1
            .desc;
        let nested = parse_error(r#"{"execute":"q","arguments":{"a":1,"a":2}}"#)
            .1
            .desc;

        assert!(
            top.starts_with("JSON parse error, duplicate key 'execute'"),
            "{top}"
        );
        assert!(
            nested.starts_with("JSON parse error, duplicate key 'a'"),
            "{nested}"
        );
    }

    #[test]
    fn invalid_utf8_is_a_json_parse_error() {
        let e = parse_command(b"{\"execute\":\"\xff\"}").unwrap_err();

        assert!(
            e.error.desc.starts_with("JSON parse error, "),
            "{}",
            e.error.desc
        );
    }

    #[test]
    fn a_frame_error_becomes_a_generic_error_without_id() {
        let reply = frame_error_reply(&FrameError::Stray { byte: b'@' });

        assert_eq!(
            line(&reply),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '@'\"}}\r\n"
        );
    }

    // --- negotiation and command lookup texts ---

    #[test]
    fn negotiation_and_lookup_errors_read_as_qemus() {
        let lines = [
            line(&error(None, QmpError::capabilities_expected())),
            line(&error(
                Some(json!(7)),
                QmpError::capabilities_already_negotiated(),
            )),
            line(&error(
                Some(json!([1, {"a": null}])),
                QmpError::command_not_found("foo"),
            )),
        ];

        assert_eq!(
            lines,
            [
                "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n",
                "{\"id\": 7, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation is already complete, command ignored\"}}\r\n",
                "{\"id\": [1, {\"a\": null}], \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command foo has not been found\"}}\r\n",
            ]
        );
    }

    #[test]
    fn qmp_capabilities_without_arguments_negotiates() {
        assert_eq!(qmp_capabilities(&Map::new(), false), Ok(()));
    }

    #[test]
    fn qmp_capabilities_twice_is_refused_after_its_arguments_are_checked() {
        let got = [
            qmp_capabilities(&object(json!({"enable": []})), true),
            qmp_capabilities(&object(json!({"x": 1})), true),
        ];

        assert_eq!(
            got,
            [
                Err(QmpError::capabilities_already_negotiated()),
                Err(generic("Parameter 'x' is unexpected")),
            ]
        );
    }

    #[test]
    fn qmp_capabilities_refuses_bad_and_unoffered_capabilities() {
        let got = [
            qmp_capabilities(&object(json!({"enable": "oob"})), false),
            qmp_capabilities(&object(json!({"enable": [1]})), false),
            qmp_capabilities(&object(json!({"enable": ["foo"]})), false),
            qmp_capabilities(&object(json!({"enable": ["oob"]})), false),
        ];

        assert_eq!(
            got,
            [
                Err(generic(
                    "Invalid parameter type for 'enable', expected: array"
                )),
                Err(generic(
                    "Invalid parameter type for 'enable[0]', expected: string"
                )),
                Err(generic("Parameter 'enable[0]' does not accept value 'foo'")),
                Err(generic("Capability oob not available")),
            ]
        );
    }

    // --- builders and the wire spelling ---

    #[test]
    fn the_greeting_is_qemus_with_no_capabilities() {
        let line = line(&greeting(
            (10, 0, 2),
            "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1",
        ));

        // QSD 10.0.2 sent this, with "capabilities": ["oob"].
        assert_eq!(
            line,
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"}, \"capabilities\": []}}\r\n"
        );
    }

    #[test]
    fn a_success_reply_puts_return_before_id() {
        let line = line(&success(Some(json!("x")), version_info((10, 0, 2), "p")));

        assert_eq!(
            line,
            "{\"return\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"p\"}, \"id\": \"x\"}\r\n"
        );
    }

    #[test]
    fn a_reply_without_id_has_no_id_member() {
        assert_eq!(line(&success(None, json!({}))), "{\"return\": {}}\r\n");
    }

    #[test]
    fn an_error_reply_puts_id_before_error() {
        let line = line(&error(Some(json!(3)), generic("boom")));

        assert_eq!(
            line,
            "{\"id\": 3, \"error\": {\"class\": \"GenericError\", \"desc\": \"boom\"}}\r\n"
        );
    }

    #[test]
    fn an_event_puts_timestamp_then_event_then_data() {
        let now = UNIX_EPOCH + Duration::new(1_795_477_286, 18_360_999);

        let line = line(&event(
            "BLOCK_EXPORT_DELETED",
            Some(json!({"id": "e0"})),
            now,
        ));

        // QSD 10.0.2 sent this line on block-export-del.
        assert_eq!(
            line,
            "{\"timestamp\": {\"seconds\": 1795477286, \"microseconds\": 18360}, \"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {\"id\": \"e0\"}}\r\n"
        );
    }

    #[test]
    fn an_event_without_data_has_no_data_member() {
        let line = line(&event(
            "RESUME",
            None,
            UNIX_EPOCH + Duration::from_micros(1_500_000),
        ));

        assert_eq!(
            line,
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 500000}, \"event\": \"RESUME\"}\r\n"
        );
    }

    #[test]
    fn an_event_before_1970_has_negative_fields_like_qemus_division() {
        let value = event("X", None, UNIX_EPOCH - Duration::from_micros(1_500_000));

        assert_eq!(
            value["timestamp"],
            json!({"seconds": -1, "microseconds": -500000})
        );
    }

    #[test]
    fn strings_are_escaped_to_ascii_as_qemu_does() {
        let e = QmpError::command_not_found("\u{e9}\u{1F600}\u{7f}/\u{1}\"\\\n");

        // QSD 10.0.2's reply to {"execute":"é😀\x7f/\u0001"}, plus the short escapes.
        assert_eq!(
            line(&error(None, e)),
            "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command \\u00E9\\uD83D\\uDE00\\u007F/\\u0001\\\"\\\\\\n has not been found\"}}\r\n"
        );
    }

    #[test]
    fn an_echoed_id_object_comes_out_in_qemus_member_order() {
        let id = json!({"b": 1, "a": [1, 2, {}], "id": null, "event": true});

        // QSD 10.0.2 echoed {"b":1,"a":[1,2,{}],"id":null,"event":true} this way.
        assert_eq!(
            line(&success(Some(id), json!({}))),
            "{\"return\": {}, \"id\": {\"a\": [1, 2, {}], \"b\": 1, \"event\": true, \"id\": null}}\r\n"
        );
    }

    #[test]
    fn the_qdict_hash_matches_qemus_buckets() {
        let got = ["return", "id", "error", "event", "data", "timestamp"].map(qdict_bucket);

        assert_eq!(got, [401, 486, 489, 361, 505, 26]);
    }

    #[test]
    fn error_classes_serialize_as_qemu_spells_them() {
        let got = serde_json::to_value([
            ErrorClass::GenericError,
            ErrorClass::CommandNotFound,
            ErrorClass::DeviceNotFound,
        ])
        .unwrap();

        assert_eq!(
            got,
            json!(["GenericError", "CommandNotFound", "DeviceNotFound"])
        );
    }

    // --- Args: QEMU's input-visitor messages, as QSD 10.0.2 sent them ---

    #[test]
    fn args_read_every_type() {
        let map = object(json!({
            "s": "x", "b": true, "i": -5, "u": 18_446_744_073_709_551_615_u64,
            "e": "read-only", "a": [1], "o": {"k": "v"}
        }));
        let mut args = Args::new(&map);

        let got = (
            args.req_str("s"),
            args.opt_bool("b"),
            args.req_i64("i"),
            args.opt_u64("u"),
            args.req_enum("e", &["retain", "read-only", "read-write"]),
            args.opt_array("a").map(|a| a.map(<[Value]>::len)),
            args.req_object("o").and_then(|mut o| o.req_str("k")),
            args.opt_str("absent"),
        );

        assert_eq!(
            got,
            (
                Ok("x"),
                Ok(Some(true)),
                Ok(-5),
                Ok(Some(u64::MAX)),
                Ok("read-only"),
                Ok(Some(1)),
                Ok("v"),
                Ok(None)
            )
        );
        assert_eq!(args.finish(), Ok(()));
    }

    #[test]
    fn a_missing_required_member_is_named() {
        let map = Map::new();

        assert_eq!(
            Args::new(&map).req_i64("fdset-id"),
            Err(generic("Parameter 'fdset-id' is missing"))
        );
    }

    #[test]
    fn an_unread_member_is_unexpected() {
        let map = object(json!({"device": "x", "size": 1, "q": 1}));
        let mut args = Args::new(&map);
        let _ = (args.opt_str("device"), args.req_i64("size"));

        assert_eq!(args.finish(), Err(generic("Parameter 'q' is unexpected")));
    }

    #[test]
    fn missing_is_reported_before_unexpected() {
        // {"execute":"block_resize","arguments":{"q":1}} -> "Parameter 'size' is missing"
        let map = object(json!({"q": 1}));
        let mut args = Args::new(&map);

        let got = args.opt_str("device").and_then(|_| args.req_i64("size"));

        assert_eq!(got, Err(generic("Parameter 'size' is missing")));
    }

    #[test]
    fn wrong_types_read_as_qemus() {
        let map = object(json!({
            "s": 1, "n": null, "b": "true", "i": "a", "f": 1.5, "big": 9_223_372_036_854_775_808_u64,
            "a": {}, "o": [], "e": 1
        }));
        let mut args = Args::new(&map);

        let got = [
            args.req_str("s").err(),
            args.opt_str("n").err(),
            args.opt_bool("b").err(),
            args.req_i64("i").err(),
            args.req_i64("f").err(),
            args.req_i64("big").err(),
            args.opt_array("a").err(),
            args.opt_object("o").err(),
            args.opt_enum("e", &["x"]).err(),
        ];

        assert_eq!(
            got.map(|e| e.map(|e| e.desc)),
            [
                "Invalid parameter type for 's', expected: string",
                "Invalid parameter type for 'n', expected: string",
                "Invalid parameter type for 'b', expected: boolean",
                "Invalid parameter type for 'i', expected: integer",
                "Invalid parameter type for 'f', expected: integer",
                "Invalid parameter type for 'big', expected: integer",
                "Invalid parameter type for 'a', expected: array",
                "Invalid parameter type for 'o', expected: object",
                "Invalid parameter type for 'e', expected: string",
            ]
            .map(|d| Some(d.to_owned()))
        );
    }

    #[test]
    fn uint64_errors_read_as_qemus_and_negatives_are_refused() {
        let map = object(json!({"a": "a", "f": 1.5, "n": null, "neg": -1, "big": 1e20}));
        let mut args = Args::new(&map);

        let got = ["a", "f", "n", "neg", "big"].map(|name| args.opt_u64(name).err());

        assert!(got
            .iter()
            .zip(["a", "f", "n", "neg", "big"])
            .all(|(e, name)| {
                *e == Some(generic(&format!("Parameter '{name}' expects uint64")))
            }));
    }

    #[test]
    fn an_enum_value_outside_the_set_is_refused() {
        // {"execute":"blockdev-snapshot-sync","arguments":{...,"mode":"x"}}
        let map = object(json!({"mode": "x"}));

        let got = Args::new(&map).opt_enum("mode", &["existing", "absolute-paths"]);

        assert_eq!(
            got,
            Err(generic("Parameter 'mode' does not accept value 'x'"))
        );
    }

    #[test]
    fn nested_errors_name_the_full_path() {
        // transaction {"actions":[1]} / [{...,"data":{"x":1}}] / [{..}, {"data":{"node":1}}]
        let map = object(json!({"actions": [{"data": {}}, {"data": {"node": 1, "x": 1}}, 1]}));
        let mut args = Args::new(&map);

        let not_object = args.opt_object_array("actions").err();
        let map = object(json!({"actions": [{"data": {}}, {"data": {"node": 1, "x": 1}}]}));
        let mut args = Args::new(&map);
        let mut actions = args.opt_object_array("actions").unwrap().unwrap();
        let mut data = actions[1].req_object("data").unwrap();
        let wrong_type = data.req_str("node").err();
        let unexpected = data.finish().err();
        let mut first = actions.remove(0);
        let missing = first
            .req_object("data")
            .and_then(|mut d| d.req_str("node"))
            .err();

        assert_eq!(
            [not_object, wrong_type, unexpected, missing].map(|e| e.map(|e| e.desc)),
            [
                "Invalid parameter type for 'actions[2]', expected: object",
                "Invalid parameter type for 'actions[1].data.node', expected: string",
                "Parameter 'actions[1].data.x' is unexpected",
                "Parameter 'actions[0].data.node' is missing",
            ]
            .map(|d| Some(d.to_owned()))
        );
    }

    #[test]
    fn invalid_value_names_the_member_like_qemu() {
        let map = Map::new();

        let e = Args::nested(&map, "backing[1]".into()).invalid_value("size", "a >0 size");

        assert_eq!(e, generic("Parameter 'backing[1].size' expects a >0 size"));
    }
}
