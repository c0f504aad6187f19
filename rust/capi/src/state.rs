//! The checkpoint format of an optimizer's state: step counters and state buffers as bytes, with
//! enough of the optimizer's description to refuse state that belongs to another one.
//!
//! All numbers little-endian:
//!
//! ```text
//! magic        8 bytes  "SBSTATE\0"
//! version      u32      SMALLBATCH_STATE_FORMAT_VERSION
//! rule         u32      a SmallbatchRule
//! tensors      u64      n
//! shapes       n x 4 u64: batch, rows, cols, flags (bit 0: factored by Adafactor)
//! steps        n x f64  per-tensor step counters
//! buffers      u64      m
//! m times:     16 bytes name (NUL-padded), u64 length, length x f32
//! checksum     u64      over every byte before it
//! ```
//!
//! Hyperparameters are not part of the state: they come from the config of the optimizer the
//! state is imported into, as a schedule's learning rate would.

use crate::config::{SmallbatchRule, SMALLBATCH_STATE_FORMAT_VERSION};
use crate::error::{CError, SmallbatchStatus};
use crate::optimizer::Optimizer;

const MAGIC: &[u8; 8] = b"SBSTATE\0";
const NAME_BYTES: usize = 16;

/// A 64-bit checksum over 8-byte words (FNV-1a's constants, one word per round): every change of
/// a single word changes it, since each round is a bijection of the running value. It guards
/// against truncated and damaged files, not against tampering.
fn checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut h: u64 = 0xCBF2_9CE4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let word = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        h = (h ^ word).wrapping_mul(PRIME);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h
}

/// Each tensor's shape and flags as stored.
fn shapes(opt: &Optimizer) -> Vec<[u64; 4]> {
    (0..opt.table.len())
        .map(|i| {
            let [b, r, c] = opt.table.matrix(i);
            let factored = opt.layout.as_ref().is_some_and(|l| l.factored[i]);
            [b as u64, r as u64, c as u64, u64::from(factored)]
        })
        .collect()
}

/// Bytes the state of `opt` takes.
pub(crate) fn size(opt: &Optimizer) -> usize {
    let n = opt.table.len();
    let buffers: usize = opt.buffers.iter().map(|b| NAME_BYTES + 8 + 4 * b.data.len()).sum();
    MAGIC.len() + 4 + 4 + 8 + n * 32 + n * 8 + 8 + buffers + 8
}

/// Writes the state of `opt` to the front of `out`; returns the bytes written.
pub(crate) fn write(opt: &Optimizer, out: &mut [u8]) -> Result<usize, CError> {
    let need = size(opt);
    if out.len() < need {
        return Err(CError::new(
            SmallbatchStatus::BufferTooSmall,
            format!("buffer has {} bytes, the state needs {need} (see smallbatch_optimizer_state_size)", out.len()),
        ));
    }
    let mut w = Writer { out: &mut out[..need], pos: 0 };
    w.put(MAGIC);
    w.put(&SMALLBATCH_STATE_FORMAT_VERSION.to_le_bytes());
    w.put(&(opt.rule() as u32).to_le_bytes());
    w.put(&(opt.table.len() as u64).to_le_bytes());
    for shape in shapes(opt) {
        for x in shape {
            w.put(&x.to_le_bytes());
        }
    }
    for &s in &opt.steps {
        w.put(&s.to_le_bytes());
    }
    w.put(&(opt.buffers.len() as u64).to_le_bytes());
    for b in &opt.buffers {
        let mut name = [0u8; NAME_BYTES];
        name[..b.name.len()].copy_from_slice(b.name.as_bytes());
        w.put(&name);
        w.put(&(b.data.len() as u64).to_le_bytes());
        let dst = w.take(4 * b.data.len());
        for (d, x) in dst.chunks_exact_mut(4).zip(&b.data) {
            d.copy_from_slice(&x.to_le_bytes());
        }
    }
    let sum = checksum(&w.out[..w.pos]);
    w.put(&sum.to_le_bytes());
    debug_assert_eq!(w.pos, need);
    Ok(need)
}

struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn take(&mut self, n: usize) -> &mut [u8] {
        let s = &mut self.out[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn put(&mut self, bytes: &[u8]) {
        self.take(bytes.len()).copy_from_slice(bytes);
    }
}

/// State read from bytes and checked against the optimizer it is for.
pub(crate) struct Parsed<'a> {
    pub steps: Vec<f64>,
    /// Each buffer's f32 data, little-endian, in the optimizer's buffer order.
    pub buffers: Vec<&'a [u8]>,
}

fn bad(message: impl Into<String>) -> CError {
    CError::new(SmallbatchStatus::State, message)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], CError> {
        match self.pos.checked_add(n).filter(|&end| end <= self.bytes.len()) {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(bad(format!("state is truncated: it ends inside its {what}"))),
        }
    }
    fn u32(&mut self, what: &str) -> Result<u32, CError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, CError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
}

/// Parses `bytes` and checks, before anything is changed, that they are intact state of this
/// format version for an optimizer like `opt`: same rule, tensors and state buffers.
pub(crate) fn read<'a>(opt: &Optimizer, bytes: &'a [u8]) -> Result<Parsed<'a>, CError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not smallbatch optimizer state (its first bytes are not the format's magic)"));
    }
    let mut r = Reader { bytes, pos: MAGIC.len() };
    let version = r.u32("version")?;
    if version != SMALLBATCH_STATE_FORMAT_VERSION {
        return Err(bad(format!(
            "state format version {version} is not supported (this library reads version {SMALLBATCH_STATE_FORMAT_VERSION})"
        )));
    }
    let body = bytes.len().checked_sub(8).filter(|&b| b >= r.pos).ok_or_else(|| bad("state is truncated"))?;
    let stored = u64::from_le_bytes([
        bytes[body],
        bytes[body + 1],
        bytes[body + 2],
        bytes[body + 3],
        bytes[body + 4],
        bytes[body + 5],
        bytes[body + 6],
        bytes[body + 7],
    ]);
    if checksum(&bytes[..body]) != stored {
        return Err(bad("checksum mismatch: the state bytes are corrupted or truncated"));
    }
    let mut r = Reader { bytes: &bytes[..body], pos: r.pos };

    let rule = r.u32("rule")?;
    if rule != opt.rule() as u32 {
        let theirs = SmallbatchRule::from_u32(rule).map(|r| r.name().to_string()).unwrap_or(format!("rule {rule}"));
        return Err(bad(format!("state of a {theirs} optimizer cannot be loaded into a {} one", opt.rule().name())));
    }
    let n = r.u64("tensor count")?;
    if n != opt.table.len() as u64 {
        return Err(bad(format!("state holds {n} tensors, this optimizer has {}", opt.table.len())));
    }
    for (i, mine) in shapes(opt).into_iter().enumerate() {
        let theirs = [r.u64("shapes")?, r.u64("shapes")?, r.u64("shapes")?, r.u64("shapes")?];
        if theirs != mine {
            return Err(bad(format!(
                "tensor {i} is [batch, rows, cols, factored] = {theirs:?} in the state, {mine:?} in this optimizer"
            )));
        }
    }
    let mut steps = Vec::with_capacity(opt.table.len());
    for _ in 0..opt.table.len() {
        steps.push(f64::from_bits(r.u64("step counters")?));
    }
    // The core's own check of step counters: planning a step on a copy validates every one.
    let mut probe = steps.clone();
    opt.table.plan_step(&vec![true; steps.len()], &mut probe).map_err(|e| bad(format!("state has an {e}")))?;

    let m = r.u64("buffer count")?;
    let mine: Vec<&str> = opt.buffers.iter().map(|b| b.name).collect();
    let mut buffers = Vec::with_capacity(opt.buffers.len());
    let mut theirs = Vec::new();
    for _ in 0..m.min(64) {
        let raw = r.take(NAME_BYTES, "buffer names")?;
        let name = String::from_utf8_lossy(raw.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
        let len = r.u64("buffer lengths")?;
        let data = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_mul(4))
            .ok_or_else(|| bad(format!("buffer {name} claims {len} elements")))?;
        buffers.push(r.take(data, "buffers")?);
        theirs.push((name, len));
    }
    let names: Vec<&str> = theirs.iter().map(|(n, _)| n.as_str()).collect();
    if m > 64 || names != mine {
        return Err(bad(format!(
            "state holds the buffers {names:?}, this optimizer keeps {mine:?} (was it made with another \
             momentum or beta1?)"
        )));
    }
    for ((name, len), b) in theirs.iter().zip(&opt.buffers) {
        if *len != b.data.len() as u64 {
            return Err(bad(format!("buffer {name} has {len} elements in the state, {} here", b.data.len())));
        }
    }
    if r.pos != body {
        return Err(bad(format!("{} unexpected bytes after the last buffer", body - r.pos)));
    }
    Ok(Parsed { steps, buffers })
}

/// Decodes little-endian f32s into `dst` (of the same count).
pub(crate) fn decode_f32(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}
