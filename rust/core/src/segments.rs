//! Segment tables: each tensor of a param group as a range of one index space (the tensors back
//! to back), which indexes the optimizer's flat state buffers and counts the random bits of
//! stochastic rounding, and which tensors one optimizer step touches.

use crate::error::{Error, Result};

/// The layout of a param group's tensors, packed back to back in one index space (and in the
/// optimizer's flat state buffers; the parameters themselves may live anywhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentTable {
    offsets: Vec<usize>,
    numels: Vec<usize>,
    /// Each tensor seen as `batch` row-major matrices of `rows x cols` (rules that need shapes,
    /// such as Adafactor's factored moments and Muon's orthogonalisation, read this).
    matrices: Vec<[usize; 3]>,
    total: usize,
}

/// The range `[start, end)` of the index space that one tensor's step covers, with its step count.
///
/// Each tensor is a run of its own, even next to a tensor with the same step count: tensors
/// need not be neighbours in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The tensor.
    pub tensor: usize,
    /// First element.
    pub start: usize,
    /// One past the last element.
    pub end: usize,
    /// The step count after this step (1 on a tensor's first step).
    pub step: u64,
}

impl Run {
    /// Number of elements in the run.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// The largest step count that is still exact in the `f64` step counters (2^53).
const MAX_EXACT_STEP: f64 = 9_007_199_254_740_992.0;

impl SegmentTable {
    /// Packs tensors of the given element counts back to back.
    ///
    /// ```
    /// use smallbatch_core::SegmentTable;
    /// let table = SegmentTable::packed(&[6, 0, 4]).unwrap();
    /// assert_eq!(table.total(), 10);
    /// assert_eq!(table.range(2), 6..10);
    /// ```
    pub fn packed(numels: &[usize]) -> Result<SegmentTable> {
        let mut offsets = Vec::with_capacity(numels.len());
        let mut total: usize = 0;
        for (i, &n) in numels.iter().enumerate() {
            offsets.push(total);
            total = total
                .checked_add(n)
                .ok_or_else(|| Error::Segments(format!("tensor {i}: total element count overflows")))?;
        }
        // Offsets are later turned into byte offsets of 8-byte elements at most.
        if total > isize::MAX as usize / 8 {
            return Err(Error::Segments(format!("{total} elements do not fit in memory")));
        }
        let matrices = numels.iter().map(|&n| [1, 1, n]).collect();
        Ok(SegmentTable { offsets, numels: numels.to_vec(), matrices, total })
    }

    /// Packs tensors given as `[batch, rows, cols]` (a tensor of shape `(..., R, C)` is
    /// `[prod(...), R, C]`; a vector of `n` elements is `[1, 1, n]`).
    ///
    /// ```
    /// use smallbatch_core::SegmentTable;
    /// let table = SegmentTable::with_matrices(&[[2, 3, 4], [1, 1, 5]]).unwrap();
    /// assert_eq!(table.numels(), &[24, 5]);
    /// assert_eq!(table.matrix(0), [2, 3, 4]);
    /// ```
    pub fn with_matrices(matrices: &[[usize; 3]]) -> Result<SegmentTable> {
        let mut numels = Vec::with_capacity(matrices.len());
        for (i, m) in matrices.iter().enumerate() {
            let n = m[0]
                .checked_mul(m[1])
                .and_then(|x| x.checked_mul(m[2]))
                .ok_or_else(|| Error::Segments(format!("tensor {i}: shape {m:?} overflows")))?;
            numels.push(n);
        }
        let mut table = SegmentTable::packed(&numels)?;
        table.matrices = matrices.to_vec();
        Ok(table)
    }

    /// Tensor `i` as `[batch, rows, cols]`.
    pub fn matrix(&self, i: usize) -> [usize; 3] {
        self.matrices[i]
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.numels.len()
    }

    /// Whether the table holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.numels.is_empty()
    }

    /// Total elements of the index space (the length of a flat buffer of the tensors).
    pub fn total(&self) -> usize {
        self.total
    }

    /// Element offsets of the tensors.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Element counts of the tensors.
    pub fn numels(&self) -> &[usize] {
        &self.numels
    }

    /// The element range of tensor `i` (panics if `i` is out of range, like slice indexing).
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i] + self.numels[i]
    }

    /// Plans one optimizer step: advances the step counter of every tensor with `stepped[i]` and
    /// returns the runs to update, one per such tensor with elements, in tensor order.
    ///
    /// `steps` holds one counter per tensor as `f64` (torch keeps `state["step"]` as a float
    /// tensor; `f64` counts exactly to 2^53, where `f32` would stop at 2^24 steps, which
    /// batch-size-1 runs reach). Nothing is written unless every counter is valid.
    ///
    /// ```
    /// use smallbatch_core::{Run, SegmentTable};
    /// let table = SegmentTable::packed(&[4, 4, 4]).unwrap();
    /// let mut steps = [2.0, 2.0, 0.0];
    /// let runs = table.plan_step(&[true, false, true], &mut steps).unwrap();
    /// assert_eq!(runs, vec![Run { tensor: 0, start: 0, end: 4, step: 3 }, Run { tensor: 2, start: 8, end: 12, step: 1 }]);
    /// assert_eq!(steps, [3.0, 2.0, 1.0]);
    /// ```
    pub fn plan_step(&self, stepped: &[bool], steps: &mut [f64]) -> Result<Vec<Run>> {
        if stepped.len() != self.len() {
            return Err(Error::Length { name: "stepped".into(), expected: self.len(), got: stepped.len() });
        }
        if steps.len() != self.len() {
            return Err(Error::Length { name: "steps".into(), expected: self.len(), got: steps.len() });
        }
        for (i, (&s, &on)) in steps.iter().zip(stepped).enumerate() {
            if on && !((0.0..MAX_EXACT_STEP).contains(&s) && s.fract() == 0.0) {
                return Err(Error::invalid(format!("step of tensor {i}"), s, "a non-negative integer below 2^53"));
            }
        }
        let mut runs: Vec<Run> = Vec::new();
        for i in 0..self.len() {
            if !stepped[i] {
                continue;
            }
            steps[i] += 1.0;
            let step = steps[i] as u64;
            let range = self.range(i);
            if !range.is_empty() {
                runs.push(Run { tensor: i, start: range.start, end: range.end, step });
            }
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_run_per_stepped_tensor_with_elements() {
        let table = SegmentTable::packed(&[3, 5, 0, 2, 7]).unwrap();
        let mut steps = [4.0, 4.0, 4.0, 9.0, 4.0];
        let runs = table.plan_step(&[true, true, true, true, false], &mut steps).unwrap();
        let run = |tensor, start, end, step| Run { tensor, start, end, step };
        assert_eq!(runs, vec![run(0, 0, 3, 5), run(1, 3, 8, 5), run(3, 8, 10, 10)]);
        // The empty tensor's step still counts.
        assert_eq!(steps, [5.0, 5.0, 5.0, 10.0, 4.0]);
    }

    #[test]
    fn invalid_step_writes_nothing() {
        let table = SegmentTable::packed(&[2, 2]).unwrap();
        let mut steps = [1.0, 2.5];
        let err = table.plan_step(&[true, true], &mut steps).unwrap_err();
        assert_eq!(err.to_string(), "invalid step of tensor 1: 2.5 (must be a non-negative integer below 2^53)");
        assert_eq!(steps, [1.0, 2.5]);
        let err = table.plan_step(&[true], &mut steps).unwrap_err();
        assert_eq!(err.to_string(), "stepped has 1 elements, expected 2");
    }
}
