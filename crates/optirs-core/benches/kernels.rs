//! Criterion benchmarks of the fused kernels: throughput in bytes of memory traffic per step,
//! from cache-resident sizes to main memory, single-threaded, at the best SIMD level and at the
//! baseline; every rule in float32, Adam in bfloat16 and float16, and the gradient norm. `cargo bench --bench kernels` (or `make bench-rust`); `OPTIRS_BENCH_MAX=100000000`
//! adds the 10^8-element size.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use optirs_core::kernels::adagrad::{AdagradHyper, AdagradScalars};
use optirs_core::kernels::adam::{AdamHyper, AdamScalars};
use optirs_core::kernels::rmsprop::{RmsPropHyper, RmsPropScalars};
use optirs_core::kernels::sgd::{SgdHyper, SgdScalars};
use optirs_core::kernels::simd::{apply, Element, SimdLevel};
use optirs_core::kernels::{Rule, Slices, Storage};

/// (name, rule, buffers used, bytes moved per element: reads + writes of 4-byte floats)
fn rules() -> Vec<(&'static str, Rule<f32>, usize, u64)> {
    let sgd = SgdHyper {
        momentum: 0.9,
        ..SgdHyper::default()
    };
    let rms = RmsPropHyper::default();
    let rms_cm = RmsPropHyper {
        centered: true,
        momentum: 0.9,
        ..rms
    };
    vec![
        (
            "sgd_momentum",
            Rule::Sgd(SgdScalars::new(&sgd, false)),
            1,
            20,
        ),
        (
            "adam",
            Rule::Adam(AdamScalars::new(&AdamHyper::default(), 10.0)),
            2,
            28,
        ),
        (
            "adamw",
            Rule::Adam(AdamScalars::new(
                &AdamHyper {
                    weight_decay: 1e-2,
                    decoupled: true,
                    ..AdamHyper::default()
                },
                10.0,
            )),
            2,
            28,
        ),
        ("rmsprop", Rule::RmsProp(RmsPropScalars::new(&rms)), 1, 20),
        (
            "rmsprop_centered_momentum",
            Rule::RmsProp(RmsPropScalars::new(&rms_cm)),
            3,
            36,
        ),
        (
            "adagrad",
            Rule::Adagrad(AdagradScalars::new(&AdagradHyper::default(), 10.0)),
            1,
            20,
        ),
    ]
}

fn sizes() -> Vec<usize> {
    let max: usize = std::env::var("OPTIRS_BENCH_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    [1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000]
        .into_iter()
        .filter(|&n| n <= max)
        .collect()
}

/// Every level this CPU has, so that each explicit vector set is measured against the others.
fn levels() -> Vec<SimdLevel> {
    SimdLevel::ALL
        .into_iter()
        .filter(|l| l.supported())
        .collect()
}

fn bench(c: &mut Criterion) {
    let levels = levels();
    for (name, rule, nbufs, bytes) in rules() {
        let mut group = c.benchmark_group(name);
        for n in sizes() {
            if n >= 10_000_000 {
                group.sample_size(10);
            }
            group.throughput(Throughput::Bytes(bytes * n as u64));
            let mut p = vec![0.5f32; n];
            let g = vec![0.25f32; n];
            let mut bufs: Vec<Vec<f32>> = (0..3).map(|_| vec![0.1f32; n]).collect();
            for &level in &levels {
                group.bench_with_input(BenchmarkId::new(level.name(), n), &n, |b, _| {
                    b.iter(|| {
                        let [b0, b1, b2] = &mut bufs[..] else {
                            unreachable!()
                        };
                        let used = [
                            Some(b0),
                            (nbufs > 1).then_some(b1),
                            (nbufs > 2).then_some(b2),
                        ];
                        let s = Slices {
                            param: &mut p,
                            grad: &g,
                            bufs: used.map(|b| b.map(Vec::as_mut_slice)),
                            rounding: optirs_core::kernels::lanes::Rounding::Nearest,
                        };
                        apply(level, &rule, s);
                    });
                });
            }
        }
        group.finish();
    }
}

/// Adam over 16-bit storage (computed in float32): bytes moved per element are half float32's.
fn bench_16_bit(c: &mut Criterion) {
    fn run<S: Element + Storage<Compute = f32>>(
        c: &mut Criterion,
        name: &str,
        to: fn(f32) -> S,
        levels: &[SimdLevel],
    ) {
        let rule = Rule::Adam(AdamScalars::new(&AdamHyper::default(), 10.0));
        let mut group = c.benchmark_group(name);
        for n in sizes() {
            if n >= 10_000_000 {
                group.sample_size(10);
            }
            group.throughput(Throughput::Bytes(14 * n as u64));
            let mut p = vec![to(0.5); n];
            let g = vec![to(0.25); n];
            let mut m = vec![to(0.1); n];
            let mut v = vec![to(0.1); n];
            for &level in levels {
                group.bench_with_input(BenchmarkId::new(level.name(), n), &n, |b, _| {
                    b.iter(|| {
                        let s = Slices {
                            param: &mut p,
                            grad: &g,
                            bufs: [Some(&mut m), Some(&mut v), None],
                            rounding: optirs_core::kernels::lanes::Rounding::Nearest,
                        };
                        apply(level, &rule, s);
                    });
                });
            }
        }
        group.finish();
    }
    let levels = levels();
    run(c, "adam_bf16", half::bf16::from_f32, &levels);
    run(c, "adam_f16", half::f16::from_f32, &levels);
}

/// The gradient norm (`clip_grad_norm_`'s first pass) over float32 and bfloat16, single-threaded,
/// at each SIMD level: bytes read per element are the gradient's.
fn bench_norm(c: &mut Criterion) {
    use optirs_core::dtype::DType;
    use optirs_core::norm::{norms, GradRef, NormType};
    optirs_core::pool::set_num_threads(1);
    let levels = levels();
    for (name, dtype, size) in [
        ("norm2_f32", DType::F32, 4usize),
        ("norm2_bf16", DType::Bf16, 2),
    ] {
        let mut group = c.benchmark_group(name);
        for n in sizes() {
            if n >= 10_000_000 {
                group.sample_size(10);
            }
            group.throughput(Throughput::Bytes((size * n) as u64));
            // 0x3E80 as bfloat16, 0x3E80_3E80 as float32: finite values either way; u64s keep
            // the float32s aligned.
            let data = vec![0x3E80_3E80_3E80_3E80u64; (n * size).div_ceil(8)];
            // SAFETY: `data` outlives every use of `g` and is only read.
            let g = [unsafe { GradRef::new(dtype, data.as_ptr().cast(), n) }];
            for &level in &levels {
                group.bench_with_input(BenchmarkId::new(level.name(), n), &n, |b, _| {
                    optirs_core::kernels::simd::set_active(level);
                    b.iter(|| norms(&g, NormType::Two));
                });
            }
        }
        group.finish();
    }
}

/// AdamW with 8-bit state (blocks of 256) over float32 parameters: bytes moved per element are
/// the parameter's read and write, the gradient's read, and each moment's code read and written
/// (absmaxes add 1/32 of a byte). The state starts from a few quantized steps, so that the codes
/// spread over the maps as in training.
fn bench_8_bit(c: &mut Criterion) {
    use optirs_core::kernels::adam8bit::{update, Q8Slices};
    let levels = levels();
    let hyper = AdamHyper {
        weight_decay: 1e-2,
        decoupled: true,
        ..AdamHyper::default()
    };
    let mut group = c.benchmark_group("adamw_8bit");
    for n in sizes() {
        if n >= 10_000_000 {
            group.sample_size(10);
        }
        group.throughput(Throughput::Bytes(14 * n as u64));
        let block = 256;
        let mut p: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 997) as f32 * 2e-5 - 0.01)
            .collect();
        let (mut m, mut v) = (vec![0u8; n], vec![0u8; n]);
        let blocks = n.div_ceil(block);
        let (mut am, mut av) = (vec![0f32; blocks], vec![0f32; blocks]);
        for &level in &levels {
            group.bench_with_input(BenchmarkId::new(level.name(), n), &n, |b, _| {
                let mut t = 1.0;
                b.iter(|| {
                    let s = Q8Slices {
                        param: &mut p,
                        grad: &g,
                        exp_avg: &mut m,
                        exp_avg_sq: &mut v,
                        exp_avg_absmax: &mut am,
                        exp_avg_sq_absmax: &mut av,
                        block,
                        rounding: optirs_core::kernels::lanes::Rounding::Nearest,
                    };
                    update(level, &AdamScalars::new(&hyper, t), s);
                    t += 1.0;
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench, bench_16_bit, bench_norm, bench_8_bit);
criterion_main!(benches);
