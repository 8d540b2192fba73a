//! LVM2 inside a backup: the logical volumes of a physical volume, read from its on-disk
//! metadata without device-mapper (`LABELONE` label in one of the first four sectors, the
//! PV header it points to, the first metadata area's header (`" LVM2 x[5A%r0N*>"`) and its
//! circular text buffer, then the volume group's text configuration). Each linear logical
//! volume becomes a [`Disk`] whose reads are mapped through its segments.
//!
//! Everything here is untrusted: the text is at most [`MAX_TEXT`] bytes, nesting and item
//! counts are bounded, every segment must lie inside the physical volume, and a logical
//! volume that needs another physical volume (a volume group spread over several disks) or
//! is not linear (striped over several, mirrored, thin, cached) is refused by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Disk, Part};
use crate::error::{AgentError, ErrorKind, Result};

/// Largest metadata text read.
pub const MAX_TEXT: u64 = 1 << 20;
/// Deepest nesting of sections accepted.
const MAX_NESTING: usize = 16;
/// Most segments one logical volume may have.
const MAX_SEGMENTS: u64 = 4096;

fn bad(part: &Part, what: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::FailedPrecondition, format!("LVM on partition {}: {what}", part.number))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// A value of the metadata's text format.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(i64),
    Str(String),
    List(Vec<Value>),
    Section(BTreeMap<String, Value>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(m) => m.get(key),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<u64> {
        match self.get(key) {
            Some(Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        }
    }

    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
}

/// Tokens of the text format: strings, words (names and numbers) and punctuation.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '#' => while chars.next().is_some_and(|c| c != '\n') {},
            '"' => {
                chars.next();
                let mut s = String::from("\"");
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => s.extend(chars.next()),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                out.push(s);
            }
            '{' | '}' | '[' | ']' | '=' | ',' => {
                chars.next();
                out.push(c.to_string());
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            _ => {
                let mut w = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "{}[]=,#\"".contains(c) {
                        break;
                    }
                    w.push(c);
                    chars.next();
                }
                out.push(w);
            }
        }
    }
    out
}

struct Parser {
    toks: Vec<String>,
    at: usize,
}

impl Parser {
    fn next(&mut self) -> Option<String> {
        let t = self.toks.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn value(&mut self, depth: usize) -> std::result::Result<Value, String> {
        if depth > MAX_NESTING {
            return Err(format!("lists nest deeper than {MAX_NESTING}"));
        }
        let t = self.next().ok_or("the text ends inside a value")?;
        if t == "[" {
            let mut list = Vec::new();
            loop {
                match self.toks.get(self.at).map(String::as_str) {
                    Some("]") => {
                        self.at += 1;
                        return Ok(Value::List(list));
                    }
                    Some(",") => self.at += 1,
                    Some(_) => list.push(self.value(depth + 1)?),
                    None => return Err("a list is not closed".into()),
                }
            }
        }
        if let Some(s) = t.strip_prefix('"') {
            return Ok(Value::Str(s.to_string()));
        }
        t.parse::<i64>().map(Value::Int).map_err(|_| format!("{t:?} is not a number or a string"))
    }

    fn section(&mut self, depth: usize) -> std::result::Result<BTreeMap<String, Value>, String> {
        if depth > MAX_NESTING {
            return Err(format!("sections nest deeper than {MAX_NESTING}"));
        }
        let mut m = BTreeMap::new();
        while let Some(key) = self.toks.get(self.at).cloned() {
            if key == "}" {
                break;
            }
            self.at += 1;
            match self.next().as_deref() {
                Some("{") => {
                    let inner = self.section(depth + 1)?;
                    if self.next().as_deref() != Some("}") {
                        return Err(format!("section {key:?} is not closed"));
                    }
                    m.insert(key, Value::Section(inner));
                }
                Some("=") => {
                    let v = self.value(depth)?;
                    m.insert(key, v);
                }
                other => return Err(format!("after {key:?}: {other:?} where '=' or '{{' belongs")),
            }
        }
        Ok(m)
    }
}

fn parse(text: &str) -> std::result::Result<Value, String> {
    let mut p = Parser { toks: tokens(text), at: 0 };
    let top = p.section(0)?;
    if p.at < p.toks.len() {
        return Err(format!("unexpected {:?} at the top level", p.toks[p.at]));
    }
    Ok(Value::Section(top))
}

/// One run of a logical volume: `len` bytes at `lv_off` come from `pv_off` of the PV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    lv_off: u64,
    len: u64,
    pv_off: u64,
}

/// A linear logical volume, read through the physical volume it lies on.
pub struct LogicalVolume {
    /// `vg/lv`.
    pub name: String,
    size: u64,
    segments: Vec<Segment>,
    disk: Arc<dyn Disk>,
    pv_start: u64,
}

impl LogicalVolume {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Disk for LogicalVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let seg = self
                .segments
                .iter()
                .find(|s| at >= s.lv_off && at < s.lv_off + s.len)
                .ok_or_else(|| std::io::Error::other(format!("{}: byte {at} is in no segment", self.name)))?;
            let n = usize::try_from((seg.lv_off + seg.len - at).min((buf.len() - done) as u64)).unwrap_or(0);
            self.disk.read_at(self.pv_start + seg.pv_off + (at - seg.lv_off), &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

/// The metadata text of the physical volume at `part`.
fn metadata_text(disk: &dyn Disk, part: &Part) -> Result<(String, String)> {
    let read = |off: u64, len: u64| -> Result<Vec<u8>> {
        if off.checked_add(len).is_none_or(|end| end > part.len) {
            return Err(bad(part, format!("{len} bytes at {off} lie beyond the physical volume")));
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        disk.read_at(part.start + off, &mut buf).map_err(|e| bad(part, format!("reading at {off}: {e}")))?;
        Ok(buf)
    };
    let head = read(0, 2048)?;
    let sector = (0..4).find(|s| &head[s * 512..s * 512 + 8] == b"LABELONE").ok_or_else(|| bad(part, "no label"))?;
    let label = &head[sector * 512..(sector + 1) * 512];
    if &label[24..32] != b"LVM2 001" {
        return Err(bad(part, "the label is not an LVM2 one (type)"));
    }
    let pvh = usize::try_from(le32(label, 20)).unwrap_or(usize::MAX);
    if !(32..=448).contains(&pvh) {
        return Err(bad(part, format!("the PV header offset {pvh} is outside the label sector")));
    }
    let pv_uuid = String::from_utf8_lossy(&label[pvh..pvh + 32]).into_owned();
    // After the uuid and the device size: data areas, then metadata areas, each list ended
    // by a zero (offset, size) pair.
    let mut at = pvh + 40;
    let mut areas = [Vec::new(), Vec::new()];
    for list in &mut areas {
        loop {
            if at + 16 > 512 {
                return Err(bad(part, "the PV header's area lists run past the label sector"));
            }
            let (off, size) = (le64(label, at), le64(label, at + 8));
            at += 16;
            if off == 0 {
                break;
            }
            list.push((off, size));
        }
    }
    let &(mda, mda_len) = areas[1].first().ok_or_else(|| bad(part, "the physical volume has no metadata area"))?;
    let mh = read(mda, 512)?;
    if &mh[4..20] != b" LVM2 x[5A%r0N*>" {
        return Err(bad(part, format!("no metadata area header at {mda} (magic)")));
    }
    let (off, size) = (le64(&mh, 40), le64(&mh, 48));
    if size == 0 || size > MAX_TEXT || off < 512 || off >= mda_len || mda_len <= 512 {
        return Err(bad(part, format!("metadata text of {size} bytes at {off} in a {mda_len}-byte area")));
    }
    // The text is in a circular buffer after the 512-byte header.
    let text = if off + size <= mda_len {
        read(mda + off, size)?
    } else {
        let first = mda_len - off;
        let mut t = read(mda + off, first)?;
        t.extend(read(mda + 512, size - first)?);
        t
    };
    let text = String::from_utf8_lossy(&text).trim_end_matches('\0').to_string();
    Ok((pv_uuid, text))
}

/// The linear logical volumes on the physical volume at `part` of `disk`, named `vg/lv`.
pub fn logical_volumes(disk: &Arc<dyn Disk>, part: &Part) -> Result<Vec<LogicalVolume>> {
    let (pv_uuid, text) = metadata_text(&**disk, part)?;
    let top = parse(&text).map_err(|e| bad(part, format!("metadata text: {e}")))?;
    let Value::Section(items) = &top else { return Err(bad(part, "metadata text is not a section")) };
    let (vg_name, vg) = items
        .iter()
        .find(|(_, v)| matches!(v, Value::Section(_)))
        .ok_or_else(|| bad(part, "the metadata names no volume group"))?;
    let sectors = |v: u64| v.checked_mul(512);
    let extent = vg.int("extent_size").and_then(sectors).filter(|e| *e > 0).ok_or_else(|| bad(part, "extent_size"))?;
    // This disk's PV among the group's: its id is the label's uuid with dashes.
    let Some(Value::Section(pvs)) = vg.get("physical_volumes") else {
        return Err(bad(part, "the volume group lists no physical volumes"));
    };
    let (this_pv, pv) = pvs
        .iter()
        .find(|(_, v)| v.str("id").is_some_and(|id| id.replace('-', "") == pv_uuid))
        .ok_or_else(|| bad(part, format!("volume group {vg_name} does not list this physical volume {pv_uuid}")))?;
    let pe_start = pv.int("pe_start").and_then(sectors).ok_or_else(|| bad(part, "pe_start"))?;
    let mut out = Vec::new();
    let Some(Value::Section(lvs)) = vg.get("logical_volumes") else { return Ok(out) };
    for (lv_name, lv) in lvs {
        let name = format!("{vg_name}/{lv_name}");
        let count = lv.int("segment_count").filter(|n| (1..=MAX_SEGMENTS).contains(n));
        let count = count.ok_or_else(|| bad(part, format!("{name}: segment_count")))?;
        let mut segments = Vec::new();
        for i in 1..=count {
            let seg = lv.get(&format!("segment{i}")).ok_or_else(|| bad(part, format!("{name}: segment{i} missing")))?;
            let kind = seg.str("type").unwrap_or_default();
            let stripes = match seg.get("stripes") {
                Some(Value::List(l)) => l.clone(),
                _ => Vec::new(),
            };
            if kind != "striped" || seg.int("stripe_count") != Some(1) || stripes.len() != 2 {
                return Err(AgentError::new(
                    ErrorKind::Unimplemented,
                    format!("logical volume {name} is not linear (segment {i}: {kind:?}); only linear ones are read"),
                ));
            }
            let (Value::Str(on), Value::Int(pe)) = (&stripes[0], &stripes[1]) else {
                return Err(bad(part, format!("{name}: segment{i} stripes")));
            };
            if on != this_pv {
                return Err(AgentError::new(
                    ErrorKind::Unimplemented,
                    format!("logical volume {name} needs physical volume {on}, which is another disk"),
                ));
            }
            let (start, len) = (seg.int("start_extent"), seg.int("extent_count"));
            let mapped = (|| {
                let lv_off = start?.checked_mul(extent)?;
                let len = len?.checked_mul(extent)?;
                let pv_off = pe_start.checked_add(u64::try_from(*pe).ok()?.checked_mul(extent)?)?;
                (pv_off.checked_add(len)? <= part.len && len > 0).then_some(Segment { lv_off, len, pv_off })
            })();
            segments.push(mapped.ok_or_else(|| bad(part, format!("{name}: segment{i} does not lie inside the PV")))?);
        }
        segments.sort_by_key(|s| s.lv_off);
        let mut size = 0;
        for s in &segments {
            if s.lv_off != size {
                return Err(bad(part, format!("{name}: its segments leave a gap or overlap at byte {size}")));
            }
            size += s.len;
        }
        out.push(LogicalVolume { name, size, segments, disk: disk.clone(), pv_start: part.start });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_parses_and_hostile_text_is_refused() {
        let t = "vg {\n id = \"a-b\"\n extent_size = 8192 # 4 MiB\n logical_volumes {\n  root {\n   segment1 {\n    stripes = [\n     \"pv0\", 3\n    ]\n   }\n  }\n }\n}\n";
        let v = parse(t).expect("parses");
        let seg = v
            .get("vg")
            .and_then(|g| g.get("logical_volumes"))
            .and_then(|l| l.get("root"))
            .and_then(|r| r.get("segment1"));
        assert_eq!(
            seg.and_then(|s| s.get("stripes")),
            Some(&Value::List(vec![Value::Str("pv0".into()), Value::Int(3)]))
        );
        assert_eq!(v.get("vg").and_then(|g| g.int("extent_size")), Some(8192));
        assert!(parse("vg { a = [ 1, 2 }").is_err());
        assert!(parse("vg { a b }").is_err());
        assert!(parse(&"a { ".repeat(40)).is_err(), "deep nesting is refused");
        assert!(parse("x = 99999999999999999999").is_err());
        assert!(parse(&format!("x = {}", "[".repeat(100_000))).is_err(), "deep lists are refused");
    }
}
