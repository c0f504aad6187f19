//! Raw addresses of the optimizer's buffers, checked before they become slices, and the check
//! that no memory a step writes overlaps anything else it touches (the core's `&mut` slices must
//! be disjoint, and a parameter aliasing its own gradient would make the result depend on the
//! order of the core's loops).

use crate::{StepError, Tensors};

/// One of the optimizer's buffers (a state buffer, the step counters) by address. Its length
/// follows from the group's table; the caller guarantees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// What it is, for error messages (`"exp_avg"`).
    pub name: &'static str,
    /// Address of element 0 (0 for a buffer the step does not use).
    pub addr: u64,
}

impl Buffer {
    /// The buffer `name` at `addr`.
    pub fn new(name: &'static str, addr: u64) -> Buffer {
        Buffer { name, addr }
    }

    /// The buffer as `len` elements of `T`, once its address can hold them (non-null unless
    /// empty, aligned).
    pub(crate) fn expect<T>(self, len: usize) -> Result<Checked<T>, StepError> {
        let size = std::mem::size_of::<T>();
        let bytes = len
            .checked_mul(size)
            .filter(|&b| self.addr.checked_add(b as u64).is_some())
            .ok_or_else(|| StepError::Invalid(format!("{}: {len} elements overflow the address space", self.name)))?;
        if len > 0 && self.addr == 0 {
            return Err(StepError::Invalid(format!("{}: null address for {len} elements", self.name)));
        }
        if !self.addr.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(StepError::Invalid(format!(
                "{}: address {:#x} is not aligned to {} bytes",
                self.name,
                self.addr,
                std::mem::align_of::<T>()
            )));
        }
        Ok(Checked { name: self.name, addr: self.addr, len, bytes, _type: std::marker::PhantomData })
    }
}

/// A buffer of `len` elements of `T` whose address has been checked.
#[derive(Debug)]
pub(crate) struct Checked<T> {
    pub(crate) name: &'static str,
    pub(crate) addr: u64,
    pub(crate) len: usize,
    pub(crate) bytes: usize,
    _type: std::marker::PhantomData<T>,
}

impl<T> Clone for Checked<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Checked<T> {}

impl<T> Checked<T> {
    /// The elements as a slice.
    ///
    /// # Safety
    /// The address must point at `len` live elements of host memory that nothing else accesses
    /// while the slice lives.
    pub(crate) unsafe fn slice_mut<'a>(&self) -> &'a mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.addr as *mut T, self.len)
    }

    /// The bytes the buffer spans, for the overlap check.
    pub(crate) fn region(&self) -> Region {
        Region { what: What::Buffer(self.name), start: self.addr, end: self.addr + self.bytes as u64, written: true }
    }
}

/// What a region is, named only when an error needs it (a group can have thousands of tensors).
#[derive(Debug, Clone, Copy)]
enum What {
    Buffer(&'static str),
    Params(usize),
    Grads(usize),
}

impl std::fmt::Display for What {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            What::Buffer(name) => write!(f, "{name}"),
            What::Params(i) => write!(f, "the parameters of tensor {i}"),
            What::Grads(i) => write!(f, "the gradients of tensor {i}"),
        }
    }
}

/// A span of memory a step reads (gradients) or writes.
#[derive(Debug, Clone)]
pub(crate) struct Region {
    what: What,
    start: u64,
    end: u64,
    written: bool,
}

/// Anything that yields a [`Region`] (checked buffers of any element type).
pub(crate) trait AsRegion {
    fn as_region(&self) -> Region;
}

impl<T> AsRegion for Checked<T> {
    fn as_region(&self) -> Region {
        self.region()
    }
}

/// Fails naming the first pair of regions that overlap where at least one is written.
///
/// Written regions are sorted and checked against their neighbours; being disjoint, their ends
/// are then sorted too, so one sweep over the sorted read regions finds any read that meets a
/// write. Reads may overlap reads. (Tensors tend to come in address order, which the sorts find
/// in linear time.)
fn check_regions(regions: Vec<Region>) -> Result<(), StepError> {
    let (mut written, mut read): (Vec<Region>, Vec<Region>) =
        regions.into_iter().filter(|r| r.end > r.start).partition(|r| r.written);
    written.sort_unstable_by_key(|r| r.start);
    read.sort_unstable_by_key(|r| r.start);
    let clash = |a: &Region, b: &Region| {
        StepError::Invalid(format!(
            "{} and {} overlap in memory; a step must not write memory it also reads elsewhere",
            a.what, b.what
        ))
    };
    for pair in written.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(clash(&pair[0], &pair[1]));
        }
    }
    let mut w = 0;
    for r in &read {
        // Writes that end before this read starts end before every later read starts too.
        while w < written.len() && written[w].end <= r.start {
            w += 1;
        }
        if w < written.len() && written[w].start < r.end {
            return Err(clash(&written[w], r));
        }
    }
    Ok(())
}

/// Checks that the parameters the step writes (stepped tensors with elements), the gradients it
/// reads and the optimizer's buffers it writes do not overlap, except gradients with gradients.
pub(crate) fn check_disjoint(tensors: &Tensors<'_>, buffers: &[&dyn AsRegion]) -> Result<(), StepError> {
    let esize = tensors.storage.element_bytes() as u64;
    let mut regions: Vec<Region> = Vec::with_capacity(buffers.len() + 2 * tensors.stepped.len());
    regions.extend(buffers.iter().map(|b| b.as_region()));
    for (i, &on) in tensors.stepped.iter().enumerate() {
        let bytes = tensors.table.numels()[i] as u64 * esize;
        if !on || bytes == 0 {
            continue;
        }
        for (what, addr, written) in
            [(What::Params(i), tensors.params[i], true), (What::Grads(i), tensors.grads[i], false)]
        {
            let end = addr
                .checked_add(bytes)
                .ok_or_else(|| StepError::Invalid(format!("{what} overflow the address space")))?;
            regions.push(Region { what, start: addr, end, written });
        }
    }
    check_regions(regions)
}

/// Checks that written buffers overlap nothing.
pub(crate) fn check_buffers_disjoint(buffers: &[&dyn AsRegion]) -> Result<(), StepError> {
    check_regions(buffers.iter().map(|b| b.as_region()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(what: &'static str, start: u64, end: u64, written: bool) -> Region {
        Region { what: What::Buffer(what), start, end, written }
    }

    #[test]
    fn reads_may_overlap_reads_but_nothing_may_overlap_a_write() {
        let ok = vec![region("g0", 0, 100, false), region("g1", 50, 150, false), region("p0", 150, 200, true)];
        assert!(check_regions(ok).is_ok());
        let err = check_regions(vec![region("p0", 0, 100, true), region("g0", 99, 120, false)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p0 and g0 overlap in memory; a step must not write memory it also reads elsewhere"
        );
        // A write inside a long read that started earlier.
        let err = check_regions(vec![
            region("g0", 0, 1000, false),
            region("g1", 10, 20, false),
            region("p1", 500, 510, true),
        ]);
        assert!(err.unwrap_err().to_string().starts_with("p1 and g0 overlap"));
        // Two writes, one inside the other.
        let err = check_regions(vec![region("p0", 0, 100, true), region("m", 40, 41, true)]).unwrap_err();
        assert!(err.to_string().starts_with("p0 and m overlap"));
        // A read after a long write that ended before it.
        assert!(check_regions(vec![
            region("p0", 0, 100, true),
            region("p1", 200, 300, true),
            region("g", 100, 200, false)
        ])
        .is_ok());
        // Empty regions overlap nothing.
        assert!(check_regions(vec![region("p0", 10, 10, true), region("p1", 0, 20, true)]).is_ok());
    }

    #[test]
    fn buffers_are_checked_before_use() {
        let b = Buffer::new("exp_avg", 0);
        assert!(b.expect::<f32>(0).is_ok());
        assert_eq!(b.expect::<f32>(3).unwrap_err().to_string(), "exp_avg: null address for 3 elements");
        let b = Buffer::new("steps", 0x1004);
        assert_eq!(b.expect::<f64>(1).unwrap_err().to_string(), "steps: address 0x1004 is not aligned to 8 bytes");
        assert!(Buffer::new("x", u64::MAX - 3).expect::<f32>(2).is_err());
    }
}
