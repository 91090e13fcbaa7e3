//! The passes against a plain reference written from torch's `_single_tensor_adafactor`, and
//! their bits across SIMD levels and thread counts.

use super::*;
use crate::engine::counter_at;
use crate::norm::GradFactor;

fn data(n: usize, seed: u32) -> Vec<f64> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (f64::from(s) / f64::from(u32::MAX) - 0.5) * 4.0
        })
        .collect()
}

/// One parameter's arrays, in storage type `S`.
#[derive(Clone, Debug, PartialEq)]
struct Case<S> {
    shape: Vec<usize>,
    p: Vec<S>,
    g: Vec<S>,
    s0: Vec<S>,
    s1: Vec<S>,
    step: f32,
}

fn factoring(shape: &[usize]) -> Factoring {
    if shape.len() < 2 {
        Factoring::Vector
    } else {
        let n = shape.len();
        Factoring::Matrix {
            batch: shape[..n - 2].iter().product(),
            rows: shape[n - 2],
            cols: shape[n - 1],
        }
    }
}

fn case<S: Storage>(shape: &[usize], seed: u32) -> Case<S> {
    let len: usize = shape.iter().product();
    let st = |v: Vec<f64>| {
        v.into_iter()
            .map(|x| S::store(S::Compute::from_f64(x)))
            .collect()
    };
    let (n0, n1) = match factoring(shape) {
        Factoring::Vector => (len, 0),
        Factoring::Matrix { batch, rows, cols } => (batch * rows, batch * cols),
    };
    Case {
        shape: shape.to_vec(),
        p: st(data(len, seed)),
        g: st(data(len, seed + 1)),
        s0: st(data(n0, seed + 2).into_iter().map(|x| x * x).collect()),
        s1: st(data(n1, seed + 3).into_iter().map(|x| x * x).collect()),
        step: 2.0,
    }
}

fn dtype_of<S: 'static>() -> DType {
    use std::any::TypeId;
    let t = TypeId::of::<S>();
    if t == TypeId::of::<f32>() {
        DType::F32
    } else if t == TypeId::of::<f64>() {
        DType::F64
    } else if t == TypeId::of::<half::f16>() {
        DType::F16
    } else {
        DType::Bf16
    }
}

/// Runs one step of optirs over `cases` (in place).
fn run<S: Storage>(
    cases: &mut [Case<S>],
    h: Hyper,
    options: &Options,
) -> Result<bool, (Option<usize>, CoreError)> {
    let params = cases
        .iter_mut()
        .map(|c| {
            // SAFETY: the case's vectors outlive the step and are used by it alone; the step
            // counter is one aligned f32.
            unsafe {
                let (slot, _, new) = counter_at((&raw mut c.step).cast(), false);
                Param::new(
                    dtype_of::<S>(),
                    c.p.len(),
                    c.p.as_mut_ptr().cast(),
                    c.g.as_ptr().cast(),
                    factoring(&c.shape),
                    [c.s0.as_mut_ptr().cast(), c.s1.as_mut_ptr().cast()],
                    Some(slot),
                    new,
                    h,
                )
            }
        })
        .collect();
    prepare(params, options)?.run()
}

/// torch's `_single_tensor_adafactor` for one parameter, written plainly: one element at a
/// time, sums in f64 in index order.
#[allow(clippy::too_many_lines)]
fn reference<S: Storage>(c: &mut Case<S>, h: Hyper, f: GradFactor) {
    type T<S> = <S as Storage>::Compute;
    let dtype = dtype_of::<S>();
    let r = |x: f64| T::<S>::from_f64(to_compute(x, dtype));
    let g: Vec<T<S>> =
        c.g.iter()
            .map(|&x| {
                let mut x = x;
                if let Some(u) = f.unscale {
                    x = S::store(x.load() / T::<S>::from_f64(u));
                }
                if let Some(k) = f.coef {
                    x = S::store(x.load() * T::<S>::from_f64(k));
                }
                if h.maximize {
                    -x.load()
                } else {
                    x.load()
                }
            })
            .collect();
    c.step += 1.0;
    let step = f64::from(c.step);
    let w = step.powf(h.beta2_decay);
    let lw = LerpWeight::<T<S>>::new(w);
    let rho = py_min(h.lr, 1.0 / step.powf(0.5));
    let n = c.p.len();
    let psum: f64 = c.p.iter().map(|x| x.load().to_f64().powi(2)).sum();
    let pnorm = to_compute(psum.sqrt(), dtype);
    let alpha = py_max(h.eps2, pnorm / (n as f64).powf(0.5)) * rho;
    let eps1 = h.eps1.unwrap_or(finfo_eps(dtype));
    let e1 = T::<S>::from_f64(eps1);
    let e1sq = T::<S>::from_f64(eps1 * eps1);
    let mut pv: Vec<T<S>> = c.p.iter().map(|x| x.load()).collect();
    if h.weight_decay != 0.0 {
        let k = T::<S>::from_f64(1.0 - h.lr * h.weight_decay);
        for x in &mut pv {
            *x = *x * k;
        }
    }
    let mut u = vec![T::<S>::ZERO; n];
    match factoring(&c.shape) {
        Factoring::Vector => {
            for i in 0..n {
                let v = lerp(c.s0[i].load(), g[i] * g[i], &lw);
                c.s0[i] = S::store(v);
                u[i] = (T::<S>::ONE / clamp_min(v, e1sq).sqrt()) * g[i];
            }
        }
        Factoring::Matrix { batch, rows, cols } => {
            for b in 0..batch {
                let at = |i: usize, j: usize| (b * rows + i) * cols + j;
                let mut rv = vec![T::<S>::ZERO; rows];
                let mut cv = vec![T::<S>::ZERO; cols];
                for i in 0..rows {
                    let s: f64 = (0..cols).map(|j| g[at(i, j)].to_f64().powi(2)).sum();
                    let nr = r(s.sqrt());
                    let mean = nr * nr / T::<S>::from_f64(cols as f64);
                    rv[i] = lerp(c.s0[b * rows + i].load(), mean, &lw);
                    c.s0[b * rows + i] = S::store(rv[i]);
                }
                for j in 0..cols {
                    let s: f64 = (0..rows).map(|i| g[at(i, j)].to_f64().powi(2)).sum();
                    let nr = r(s.sqrt());
                    let mean = nr * nr / T::<S>::from_f64(rows as f64);
                    cv[j] = lerp(c.s1[b * cols + j].load(), mean, &lw);
                    c.s1[b * cols + j] = S::store(cv[j]);
                }
                let sum: f64 = rv.iter().map(|x| x.to_f64()).sum();
                let m = clamp_min(r(sum) / T::<S>::from_f64(rows as f64), e1);
                for i in 0..rows {
                    for j in 0..cols {
                        let v = clamp_min(rv[i] * cv[j] / m, e1sq);
                        u[at(i, j)] = (T::<S>::ONE / v.sqrt()) * g[at(i, j)];
                    }
                }
            }
        }
    }
    let usum: f64 = u.iter().map(|x| x.to_f64().powi(2)).sum();
    let unorm = to_compute(usum.sqrt(), dtype);
    let denom = py_max(1.0, unorm / ((n as f64).powf(0.5) * h.d));
    let a = T::<S>::from_f64(-alpha / denom);
    for i in 0..n {
        c.p[i] = S::store(pv[i] + a * u[i]);
    }
}

const HYPER: Hyper = Hyper {
    lr: 0.01,
    beta2_decay: -0.8,
    eps1: None,
    eps2: 1e-3,
    d: 1.0,
    weight_decay: 0.0,
    maximize: false,
};

fn shapes() -> Vec<Vec<usize>> {
    let wide = if cfg!(miri) { PIECE + 3 } else { 70 };
    let tall = if cfg!(miri) { 9 } else { PIECE / 8 + 3 };
    vec![
        vec![],
        vec![1],
        vec![7],
        vec![2 * PIECE + 5],
        vec![3, 5],
        vec![1, 1],
        vec![2, 3, 4],
        vec![tall, 9],
        vec![2, 3, wide],
    ]
}

fn options() -> Options {
    Options {
        skip_nonfinite: false,
        flush_denormals: false,
        grad_factor: GradFactor::default(),
        panic_for_tests: None,
    }
}

/// Within `tol` relative to the larger value or 1 (the reference sums in another order, so its sums
/// may differ in their last `f64` bit, which rarely moves a rounded result by one).
fn close<S: Storage>(a: &[S], b: &[S], tol: f64) -> bool {
    a.iter().zip(b).all(|(x, y)| {
        let (x, y) = (x.load().to_f64(), y.load().to_f64());
        x == y || (x - y).abs() <= tol * x.abs().max(y.abs()).max(1.0) || (x.is_nan() && y.is_nan())
    })
}

fn check_against_reference<S: Storage>(tol: f64) {
    let hypers = [
        HYPER,
        Hyper {
            weight_decay: 0.1,
            maximize: true,
            eps1: Some(1e-3),
            d: 1.5,
            ..HYPER
        },
        Hyper {
            lr: 1.0,
            beta2_decay: -0.5,
            eps1: Some(0.0),
            ..HYPER
        },
    ];
    let factors = [
        GradFactor::default(),
        GradFactor {
            unscale: Some(8.0),
            coef: Some(0.3),
        },
    ];
    for (hi, h) in hypers.into_iter().enumerate() {
        for f in factors {
            let mut ours: Vec<Case<S>> = shapes()
                .iter()
                .enumerate()
                .map(|(i, s)| case(s, (hi * 31 + i) as u32))
                .collect();
            let mut theirs = ours.clone();
            let o = Options {
                grad_factor: f,
                ..options()
            };
            for _ in 0..2 {
                assert!(run(&mut ours, h, &o).unwrap());
                for c in &mut theirs {
                    reference(c, h, f);
                }
            }
            for (a, b) in ours.iter().zip(&theirs) {
                assert_eq!(a.step, b.step);
                assert!(close(&a.p, &b.p, tol), "{:?} {h:?} {f:?}: param", a.shape);
                assert!(close(&a.s0, &b.s0, tol), "{:?} {h:?}: state 0", a.shape);
                assert!(close(&a.s1, &b.s1, tol), "{:?} {h:?}: state 1", a.shape);
            }
        }
    }
}

#[test]
fn float32_matches_the_reference() {
    check_against_reference::<f32>(4.0 * f64::from(f32::EPSILON));
}

#[test]
fn float64_matches_the_reference() {
    // The norms are f64 sums themselves here, not rounded to a narrower type: the reference's
    // other summation order shows in their last bits (about n * eps relative).
    check_against_reference::<f64>(1e-12);
}

#[test]
fn sixteen_bit_matches_the_reference() {
    check_against_reference::<half::bf16>(0.008);
    check_against_reference::<half::f16>(0.001);
}

#[test]
fn every_simd_level_and_thread_count_gives_the_same_bits() {
    let h = Hyper {
        weight_decay: 0.01,
        ..HYPER
    };
    let start: Vec<Case<f32>> = shapes()
        .iter()
        .enumerate()
        .map(|(i, s)| case(s, i as u32))
        .collect();
    let before = simd::active();
    let mut seen = Vec::new();
    for level in SimdLevel::ALL.into_iter().filter(|l| l.supported()) {
        simd::set_active(level);
        for threads in [1, 2, 3] {
            pool::set_num_threads(threads);
            let mut c = start.clone();
            assert!(run(&mut c, h, &options()).unwrap());
            seen.push(c);
        }
    }
    simd::set_active(before);
    let bits = |c: &Vec<Case<f32>>| {
        c.iter()
            .flat_map(|c| c.p.iter().chain(&c.s0).chain(&c.s1).map(|x| x.to_bits()))
            .collect::<Vec<_>>()
    };
    for c in &seen {
        assert_eq!(bits(c), bits(&seen[0]));
    }
}

#[test]
fn a_non_finite_gradient_skips_the_step_with_skip_nonfinite() {
    let mut c = vec![case::<f32>(&[3, 4], 1), case::<f32>(&[5], 2)];
    c[1].g[2] = f32::NAN;
    let before = c.clone();
    let o = Options {
        skip_nonfinite: true,
        ..options()
    };
    assert!(!run(&mut c, HYPER, &o).unwrap());
    // Debug output: NaN compares unequal to itself.
    assert_eq!(format!("{c:?}"), format!("{before:?}"));
    assert!(run(&mut c, HYPER, &options()).unwrap());
    // Only that element turns NaN: the update's norm is NaN, and Python's `max(1.0, nan)` is
    // 1.0, so the others are stepped unclipped.
    assert!(c[1].p[2].is_nan());
    assert_eq!(c[1].p.iter().filter(|x| x.is_finite()).count(), 4);
    assert_eq!(c[0].step, 3.0);
}

#[test]
fn torch_failures_are_refused_before_anything_is_written() {
    let mut c = vec![case::<f32>(&[3, 4], 1), case::<f32>(&[0, 4], 2)];
    let before = c.clone();
    let (at, e) = run(&mut c, HYPER, &options()).unwrap_err();
    assert_eq!(at, Some(1));
    assert_eq!(e.kind, ErrorKind::Torch(TorchRaises::ZeroDivision));
    assert_eq!(c, before);
    let mut c = vec![case::<f32>(&[3, 4], 1)];
    let (_, e) = run(&mut c, Hyper { d: 0.0, ..HYPER }, &options()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Torch(TorchRaises::ZeroDivision));
    let (_, e) = run(
        &mut c,
        Hyper {
            eps1: Some(1e300),
            ..HYPER
        },
        &options(),
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Torch(TorchRaises::Runtime));
    // A step size out of float32's range is known once the norms are: refused all the same,
    // before the row and column factors or the parameter are written.
    let (at, e) = run(
        &mut c,
        Hyper {
            eps2: 1e300,
            ..HYPER
        },
        &options(),
    )
    .unwrap_err();
    assert_eq!(
        (at, e.kind),
        (Some(0), ErrorKind::Torch(TorchRaises::Runtime))
    );
    assert_eq!(c, vec![case::<f32>(&[3, 4], 1)]);
    // float64 takes it.
    let mut c = vec![case::<f64>(&[3, 4], 1)];
    assert!(run(
        &mut c,
        Hyper {
            eps2: 1e300,
            ..HYPER
        },
        &options()
    )
    .unwrap());
}

#[test]
fn pieces_cover_every_element_once_in_order() {
    let params: Vec<Case<f32>> = shapes().iter().map(|s| case(s, 0)).collect();
    let mut cs = params;
    let ps: Vec<Param> = cs
        .iter_mut()
        .map(|c| {
            // SAFETY: only the shapes are used; nothing is read or written.
            unsafe {
                Param::new(
                    DType::F32,
                    c.p.len(),
                    c.p.as_mut_ptr().cast(),
                    c.g.as_ptr().cast(),
                    factoring(&c.shape),
                    [c.s0.as_mut_ptr().cast(), c.s1.as_mut_ptr().cast()],
                    None,
                    1.0,
                    HYPER,
                )
            }
        })
        .collect();
    let work = pieces(&ps);
    for (i, p) in ps.iter().enumerate() {
        let mine: Vec<_> = work.iter().filter(|w| w.param == i).collect();
        let mut at = 0;
        for w in mine {
            assert_eq!(w.start, at);
            assert!(
                w.len
                    <= PIECE.max(match p.factoring {
                        Factoring::Matrix { cols, .. } => cols,
                        Factoring::Vector => 0,
                    })
            );
            at += w.len;
        }
        assert_eq!(at, p.len);
    }
}

/// Runs one step over bfloat16 `cases` (in place), each written from a master copy (`masters`,
/// one per case) or stochastically with the key of (`seed`, step 1, its index).
fn run_rounded(
    cases: &mut [Case<half::bf16>],
    masters: Option<&mut [Vec<f32>]>,
    seed: u64,
) -> Result<bool, (Option<usize>, CoreError)> {
    let mut masters = masters.map(|m| m.iter_mut().map(Vec::as_mut_ptr).collect::<Vec<_>>());
    let params = cases
        .iter_mut()
        .enumerate()
        .map(|(k, c)| {
            // SAFETY: as in `run`; each master copy has the case's length and outlives the step.
            unsafe {
                let (slot, _, new) = counter_at((&raw mut c.step).cast(), false);
                let p = Param::new(
                    DType::Bf16,
                    c.p.len(),
                    c.p.as_mut_ptr().cast(),
                    c.g.as_ptr().cast(),
                    factoring(&c.shape),
                    [c.s0.as_mut_ptr().cast(), c.s1.as_mut_ptr().cast()],
                    Some(slot),
                    new,
                    HYPER,
                );
                match masters.as_mut() {
                    Some(m) => p.with_master(m[k].cast()),
                    None => p.with_stochastic_rounding(SrKey::new(seed, 1, k as u64)),
                }
            }
        })
        .collect();
    prepare(params, &options())?.run()
}

/// Stochastic rounding and a master copy, at every level and thread count: the master copy
/// takes the float32 result that round to nearest rounds (the copy starts as the parameter, so
/// the step's inputs are the same), and stochastic rounding rounds that result with each
/// element's random bits, keyed by its index within its parameter across pieces.
#[test]
fn rounding_options_round_the_same_float32_result() {
    let start: Vec<Case<half::bf16>> = shapes()
        .iter()
        .enumerate()
        .map(|(i, s)| case(s, i as u32))
        .collect();
    let mut nearest = start.clone();
    assert!(run(&mut nearest, HYPER, &options()).unwrap());
    let before = simd::active();
    for level in SimdLevel::ALL.into_iter().filter(|l| l.supported()) {
        simd::set_active(level);
        for threads in [1, 3] {
            pool::set_num_threads(threads);
            let mut c = start.clone();
            let mut m: Vec<Vec<f32>> = c
                .iter()
                .map(|c| c.p.iter().map(|x| x.load()).collect())
                .collect();
            assert!(run_rounded(&mut c, Some(&mut m), 0).unwrap());
            let mut s = start.clone();
            assert!(run_rounded(&mut s, None, 0xABCD).unwrap());
            for (k, ((c, s), (m, n))) in c.iter().zip(&s).zip(m.iter().zip(&nearest)).enumerate() {
                assert_eq!((&c.p, &c.s0, &c.s1), (&n.p, &n.s0, &n.s1), "{level:?} {k}");
                assert_eq!((&s.s0, &s.s1), (&n.s0, &n.s1), "{level:?} {k}");
                let key = SrKey::new(0xABCD, 1, k as u64);
                for (i, (&x, (&pm, &ps))) in m.iter().zip(c.p.iter().zip(&s.p)).enumerate() {
                    assert_eq!(pm, half::bf16::store(x), "{level:?} {k} {i}");
                    let want = half::bf16::store_sr(x, sr::bits(key, i));
                    assert_eq!(ps.to_bits(), want.to_bits(), "{level:?} {k} {i}");
                }
            }
        }
    }
    simd::set_active(before);
}
