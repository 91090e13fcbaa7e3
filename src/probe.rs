//! The memory-traffic ceiling the benchmark compares each optimizer against: the same read
//! and write streams over the same thread pool and chunking, with no arithmetic worth the name
//! (one XOR per byte), so its time is what moving those bytes costs on this machine.

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use optirs_core::kernels::SimdLevel;
use optirs_core::{pool, CoreError};

use crate::errors::value_err;

/// Bytes per work item, as for the optimizer steps (`CHUNK_ELEMS` float32 elements).
const CHUNK_BYTES: usize = optirs_core::CHUNK_ELEMS * 4;

struct Stream {
    ptr: *mut u8,
    len: usize,
}

fn stream(a: &Bound<'_, PyUntypedArray>, write: bool, i: usize) -> Result<Stream, CoreError> {
    if !a.is_c_contiguous() {
        return value_err!("array {i} must be C-contiguous");
    }
    // SAFETY: live ndarray; plain field reads.
    let (ptr, flags) = unsafe {
        let raw = &(*a.as_array_ptr()).fields;
        (raw.data.cast::<u8>(), raw.flags)
    };
    if write && flags & numpy::npyffi::NPY_ARRAY_WRITEABLE == 0 {
        return value_err!("array {i} must be writeable");
    }
    Ok(Stream {
        ptr,
        len: a.len() * a.dtype().itemsize(),
    })
}

/// `read_write[k][i] ^= read_only[0][i] ^ read_only[1][i] ^ ...` for every byte `i`.
///
/// # Errors
/// When the arrays differ in size, are not contiguous, or the written ones are read-only or
/// overlap any other.
pub fn traffic(
    py: Python<'_>,
    read_only: &[Bound<'_, PyUntypedArray>],
    read_write: &[Bound<'_, PyUntypedArray>],
) -> Result<(), CoreError> {
    let ro: Vec<Stream> = read_only
        .iter()
        .enumerate()
        .map(|(i, a)| stream(a, false, i))
        .collect::<Result<_, _>>()?;
    let rw: Vec<Stream> = read_write
        .iter()
        .enumerate()
        .map(|(i, a)| stream(a, true, i))
        .collect::<Result<_, _>>()?;
    let Some(len) = rw.first().map(|s| s.len) else {
        return value_err!("traffic needs at least one array to write");
    };
    if ro.iter().chain(&rw).any(|s| s.len != len) {
        return value_err!("traffic needs arrays of equal size in bytes");
    }
    let mut spans: Vec<(usize, usize, bool)> = ro
        .iter()
        .map(|s| (s.ptr as usize, s.ptr as usize + len, false))
        .chain(
            rw.iter()
                .map(|s| (s.ptr as usize, s.ptr as usize + len, true)),
        )
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if len > 0 && pair[1].0 < pair[0].1 && (pair[0].2 || pair[1].2) {
            return value_err!("traffic's arrays must not overlap");
        }
    }
    // SAFETY: contiguous arrays of `len` bytes, alive for this call, written ones disjoint
    // from every other.
    let (ro, rw): (Vec<&[u8]>, Vec<&mut [u8]>) = unsafe {
        let mk = |s: &Stream| std::slice::from_raw_parts_mut(s.ptr, len);
        (
            ro.iter().map(|s| &*mk(s)).collect(),
            rw.iter().map(mk).collect(),
        )
    };
    let mut items = Vec::new();
    let mut offset = 0;
    let mut rest = rw;
    while offset < len {
        let n = CHUNK_BYTES.min(len - offset);
        let mut heads = Vec::with_capacity(rest.len());
        let mut tails = Vec::with_capacity(rest.len());
        for s in rest {
            let (h, t) = s.split_at_mut(n);
            heads.push(h);
            tails.push(t);
        }
        let reads: Vec<&[u8]> = ro.iter().map(|s| &s[offset..offset + n]).collect();
        items.push((reads, heads));
        rest = tails;
        offset += n;
    }
    let level = optirs_core::kernels::simd::active();
    py.detach(|| {
        pool::for_each(items, len / 4, |(reads, mut writes)| {
            stream_chunk(level, &reads, &mut writes);
        });
    });
    Ok(())
}

/// One chunk: a zipped single pass over 32-bit words when the streams fit the shapes the
/// optimizers have (one gradient read, 1 to 4 buffers read and written), compiled for the same
/// SIMD level as the kernels; byte blocks otherwise.
fn stream_chunk(level: SimdLevel, reads: &[&[u8]], writes: &mut [&mut [u8]]) {
    let words = |b: &[u8]| b.len().is_multiple_of(4) && (b.as_ptr() as usize).is_multiple_of(4);
    if reads.len() == 1
        && (1..=4).contains(&writes.len())
        && reads.iter().all(|r| words(r))
        && writes.iter().all(|w| words(w))
    {
        // SAFETY: length and address are multiples of 4, so the bytes are whole u32 words.
        #[allow(clippy::cast_ptr_alignment)] // checked by `words` just above
        let r = unsafe {
            std::slice::from_raw_parts(reads[0].as_ptr().cast::<u32>(), reads[0].len() / 4)
        };
        #[allow(clippy::cast_ptr_alignment)] // checked by `words` just above
        let mut ws: Vec<&mut [u32]> = writes
            .iter_mut()
            .map(|w| unsafe {
                std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<u32>(), w.len() / 4)
            })
            .collect();
        dispatch(level, r, &mut ws);
    } else {
        xor_into(reads, writes);
    }
}

#[inline(always)]
fn words_pass(r: &[u32], ws: &mut [&mut [u32]]) {
    match ws {
        [a] => a.iter_mut().zip(r).for_each(|(a, &x)| *a ^= x),
        [a, b] => a
            .iter_mut()
            .zip(b.iter_mut())
            .zip(r)
            .for_each(|((a, b), &x)| {
                *a ^= x;
                *b ^= x;
            }),
        [a, b, c] => a
            .iter_mut()
            .zip(b.iter_mut())
            .zip(c.iter_mut())
            .zip(r)
            .for_each(|(((a, b), c), &x)| {
                *a ^= x;
                *b ^= x;
                *c ^= x;
            }),
        [a, b, c, d] => a
            .iter_mut()
            .zip(b.iter_mut())
            .zip(c.iter_mut())
            .zip(d.iter_mut())
            .zip(r)
            .for_each(|((((a, b), c), d), &x)| {
                *a ^= x;
                *b ^= x;
                *c ^= x;
                *d ^= x;
            }),
        _ => {}
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn words_avx512(r: &[u32], ws: &mut [&mut [u32]]) {
    words_pass(r, ws);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn words_avx2(r: &[u32], ws: &mut [&mut [u32]]) {
    words_pass(r, ws);
}

fn dispatch(level: SimdLevel, r: &[u32], ws: &mut [&mut [u32]]) {
    match level.clamped() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the level (clamped by detect()).
        SimdLevel::Avx512 => unsafe { words_avx512(r, ws) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { words_avx2(r, ws) },
        _ => words_pass(r, ws),
    }
}

/// Fixed-size blocks give the compiler loops it vectorises, whatever the number of streams.
const BLOCK: usize = 256;

fn xor_into(reads: &[&[u8]], writes: &mut [&mut [u8]]) {
    let n = writes.first().map_or(0, |w| w.len());
    let mut start = 0;
    while start < n {
        let m = BLOCK.min(n - start);
        let mut acc = [0u8; BLOCK];
        for r in reads {
            for (a, &x) in acc[..m].iter_mut().zip(&r[start..start + m]) {
                *a ^= x;
            }
        }
        for w in writes.iter_mut() {
            for (x, &a) in w[start..start + m].iter_mut().zip(&acc[..m]) {
                *x ^= a;
            }
        }
        start += m;
    }
}
