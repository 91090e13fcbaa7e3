//! The unsafe core of a step: raw pointers to slices (`slices`), work items (`make_items`), the
//! step counters (`counter_at`) and the pool, run as `Work::run` runs them once the bindings
//! have released the interpreter. `make miri` runs these to check the pointer handling and the
//! hand-over of items between threads; `make tsan` runs them under ThreadSanitizer.

use super::*;
use crate::kernels::adagrad::{AdagradHyper, AdagradScalars};
use crate::kernels::adam::{AdamHyper, AdamScalars};
use crate::kernels::rmsprop::{RmsPropHyper, RmsPropScalars};
use crate::kernels::sgd::{SgdHyper, SgdScalars};
use crate::kernels::Float;
use crate::rules::RuleOf;

/// Parameter lengths: under Miri a few awkward ones below a work item; otherwise lengths that
/// make several items of one parameter, the last one short.
fn lengths() -> [usize; 3] {
    if cfg!(miri) {
        [7, 17, 33]
    } else {
        [2 * CHUNK_ELEMS + 7, CHUNK_ELEMS, 17]
    }
}

/// One parameter's arrays, as the Python side would hand them over.
struct Arrays<S> {
    param: Vec<S>,
    bufs: [Option<Vec<S>>; 3],
}

impl<S: Storage> Arrays<S> {
    fn new(n: usize, seed: usize, used: usize) -> Self {
        let v = |k: usize| -> Vec<S> {
            (0..n)
                .map(|i| {
                    S::store(S::Compute::from_f64(
                        (((i * 7 + k * 3 + seed) % 23) as f64 - 11.0) / 8.0,
                    ))
                })
                .collect()
        };
        Arrays {
            param: v(0),
            bufs: [0, 1, 2].map(|k| {
                (k < used).then(|| {
                    v(k + 1)
                        .iter()
                        .map(|x| S::store(x.load() * x.load()))
                        .collect()
                })
            }),
        }
    }

    /// `Checked` as the bindings build it: raw pointers to these arrays and `grad`.
    fn checked(
        &mut self,
        dtype: DType,
        grad: &[S],
        rule: RuleOf,
        counter: Option<&mut f64>,
    ) -> Checked {
        assert_eq!(grad.len(), self.param.len());
        Checked {
            dtype,
            state_dtype: dtype,
            len: self.param.len(),
            param: self.param.as_mut_ptr().cast(),
            grad: grad.as_ptr().cast(),
            bufs: self
                .bufs
                .each_mut()
                .map(|b| b.as_mut().map(|b| b.as_mut_ptr().cast())),
            // The slot `counter_at` makes, made here (see the last test).
            step: counter.map(|c| {
                let new = *c + 1.0;
                // SAFETY: the counter outlives the step it is written in.
                CounterSlot::F64(unsafe { &mut *std::ptr::from_mut(c) }, new)
            }),
            scalars: [None, None],
            rule,
            write: WriteMode::Nearest,
        }
    }

    fn bits(&self) -> Vec<u64> {
        std::iter::once(&self.param)
            .chain(self.bufs.iter().flatten())
            .flat_map(|v| v.iter().map(|x| x.load().to_f64().to_bits()))
            .collect()
    }
}

/// `Work::run`: the non-finite check and the update, over the pool
/// when `threads > 1` (the work is claimed large enough for it whatever the lengths), then the
/// counters.
fn execute_without_python(mut checked: Vec<Checked>, threads: usize, skip_nonfinite: bool) -> bool {
    let mut items = Vec::with_capacity(checked.len());
    make_items(&checked, &mut items);
    let counters: Vec<CounterSlot<'_>> = checked.iter_mut().filter_map(|c| c.step.take()).collect();
    let level = simd::active();
    let total = if threads > 1 {
        pool::PARALLEL_MIN_ELEMS
    } else {
        0
    };
    if skip_nonfinite && !pool::all(&items, total, Item::grad_is_finite) {
        return false;
    }
    pool::for_each(items, total, |it| {
        // Miri cannot store float16 vector lanes (see `kernels::tests::miri_can_run`).
        let f16 = matches!(it, Item::F16(..));
        it.run(if cfg!(miri) && f16 {
            simd::SimdLevel::Baseline
        } else {
            level
        });
    });
    for slot in counters {
        slot.write();
    }
    true
}

/// Float32 Adam (two parameters reading one gradient), float64 SGD with momentum, float16
/// RMSprop and bfloat16 Adagrad in one step, twice; returns every array's bits and the
/// counters.
fn two_steps(threads: usize, bad_grad: bool) -> (Vec<Vec<u64>>, Vec<f64>, [bool; 2]) {
    let [n0, n1, n2] = lengths();
    let mut a = Arrays::<f32>::new(n0, 1, 2);
    let mut b = Arrays::<f32>::new(n0, 2, 2);
    let mut c = Arrays::<f64>::new(n1, 3, 1);
    let mut d = Arrays::<half::f16>::new(n2, 4, 1);
    let mut e = Arrays::<half::bf16>::new(n2, 5, 1);
    let mut g32: Vec<f32> = Arrays::new(n0, 6, 0).param;
    if bad_grad {
        g32[n0 / 2] = f32::NAN;
    }
    let g64: Vec<f64> = Arrays::new(n1, 7, 0).param;
    let g16: Vec<half::f16> = Arrays::new(n2, 8, 0).param;
    let gb16: Vec<half::bf16> = Arrays::new(n2, 9, 0).param;
    let mut counters = vec![0.0f64; 3];
    let mut applied = [false; 2];
    for (k, done) in applied.iter_mut().enumerate() {
        let step = k as f64 + 1.0;
        let adam = RuleOf::F32(Rule::Adam(AdamScalars::new(
            &AdamHyper {
                weight_decay: 0.1,
                ..AdamHyper::default()
            },
            step,
        )));
        let sgd = RuleOf::F64(Rule::Sgd(SgdScalars::new(
            &SgdHyper {
                momentum: 0.9,
                ..SgdHyper::default()
            },
            false,
        )));
        let rms = RuleOf::F32(Rule::RmsProp(RmsPropScalars::new(&RmsPropHyper::default())));
        let ada = RuleOf::F32(Rule::Adagrad(AdagradScalars::new(
            &AdagradHyper::default(),
            step,
        )));
        let [ca, cb, cc] = &mut counters[..] else {
            unreachable!()
        };
        let checked = vec![
            a.checked(DType::F32, &g32, adam, Some(ca)),
            b.checked(DType::F32, &g32, adam, Some(cb)),
            c.checked(DType::F64, &g64, sgd, None),
            d.checked(DType::F16, &g16, rms, Some(cc)),
            e.checked(DType::Bf16, &gb16, ada, None),
        ];
        *done = execute_without_python(checked, threads, bad_grad);
    }
    let bits = vec![a.bits(), b.bits(), c.bits(), d.bits(), e.bits()];
    (bits, counters, applied)
}

#[test]
fn a_step_on_the_pool_writes_what_a_step_on_one_thread_writes() {
    pool::set_num_threads(1);
    let alone = two_steps(1, false);
    pool::set_num_threads(3);
    let shared = two_steps(3, false);
    assert_eq!(alone.2, [true, true]);
    assert_eq!(alone.1, [2.0, 2.0, 2.0]);
    assert!(alone.0 == shared.0, "a step on the pool wrote other bits");
    assert_eq!(alone.1, shared.1);
    assert_eq!(shared.2, [true, true]);
}

#[test]
fn a_step_on_the_pool_skipped_for_a_non_finite_gradient_writes_nothing() {
    pool::set_num_threads(2);
    let (bits, counters, applied) = two_steps(2, true);
    assert_eq!(applied, [false, false]);
    assert_eq!(counters, [0.0, 0.0, 0.0]);
    let [n0, n1, n2] = lengths();
    let untouched = vec![
        Arrays::<f32>::new(n0, 1, 2).bits(),
        Arrays::<f32>::new(n0, 2, 2).bits(),
        Arrays::<f64>::new(n1, 3, 1).bits(),
        Arrays::<half::f16>::new(n2, 4, 1).bits(),
        Arrays::<half::bf16>::new(n2, 5, 1).bits(),
    ];
    assert!(bits == untouched, "a skipped step wrote");
}

/// MIRI FINDING (open; `make miri` fails on it): `counter_at` returns `&mut *p` beside `*p`,
/// read through `p` after that borrow was made, which Stacked Borrows rejects ("trying to
/// retag from <tag> for Unique permission ..., but that tag does not exist in the borrow
/// stack"): the read pops the unique borrow the slot then holds. Tree Borrows accepts it.
/// Reading the value before borrowing (`let old = *p; ... (CounterSlot::F64(&mut *p, new),
/// old, new)`) is the fix; the other tests here build the slot themselves meanwhile.
#[test]
fn the_counter_at_a_pointer_reads_and_writes_its_dtype() {
    let mut wide = 41.0f64;
    // SAFETY: a live, aligned float64.
    let (slot, old, new) = unsafe { counter_at(std::ptr::from_mut(&mut wide).cast(), true) };
    assert_eq!((old, new), (41.0, 42.0));
    slot.write();
    assert_eq!(wide, 42.0);
    // float32 counts stop at 2^24, where `+= 1` rounds back, as in torch.
    let mut narrow = 16_777_216.0f32;
    // SAFETY: a live, aligned float32.
    let (slot, old, new) = unsafe { counter_at(std::ptr::from_mut(&mut narrow).cast(), false) };
    assert_eq!((old, new), (16_777_216.0, 16_777_216.0));
    slot.write();
    assert_eq!(narrow, 16_777_216.0);
}

/// A step reading its gradients through a `GradFactor` (GradScaler's scale, then a clip
/// coefficient) writes what a plain step writes over gradients factored beforehand, each
/// product rounded to the dtype: float32 Adam, float64 SGD, float16 RMSprop, bfloat16 Adagrad,
/// at lengths across work items and the scratch's pieces.
#[test]
fn a_factored_step_is_the_step_over_factored_gradients() {
    fn factored<S: Storage>(g: &[S], f: GradFactor) -> Vec<S> {
        let u = S::Compute::from_f64(f.unscale.unwrap_or(1.0));
        let c = S::Compute::from_f64(f.coef.unwrap_or(1.0));
        g.iter()
            .map(|x| S::store(S::store(x.load() / u).load() * c))
            .collect()
    }
    let factor = GradFactor {
        unscale: Some(3.0),
        coef: Some(0.37),
    };
    let [n0, n1, n2] = lengths();
    let run = |pre: bool| {
        let mut a = Arrays::<f32>::new(n0, 1, 2);
        let mut c = Arrays::<f64>::new(n1, 3, 1);
        let mut d = Arrays::<half::f16>::new(n2, 4, 1);
        let mut e = Arrays::<half::bf16>::new(n2, 5, 1);
        let mut g32: Vec<f32> = Arrays::new(n0, 6, 0).param;
        let mut g64: Vec<f64> = Arrays::new(n1, 7, 0).param;
        let mut g16: Vec<half::f16> = Arrays::new(n2, 8, 0).param;
        let mut gb16: Vec<half::bf16> = Arrays::new(n2, 9, 0).param;
        if pre {
            g32 = factored(&g32, factor);
            g64 = factored(&g64, factor);
            g16 = factored(&g16, factor);
            gb16 = factored(&gb16, factor);
        }
        let adam = RuleOf::F32(Rule::Adam(AdamScalars::new(&AdamHyper::default(), 1.0)));
        let sgd = RuleOf::F64(Rule::Sgd(SgdScalars::new(
            &SgdHyper {
                momentum: 0.9,
                ..SgdHyper::default()
            },
            false,
        )));
        let rms = RuleOf::F32(Rule::RmsProp(RmsPropScalars::new(&RmsPropHyper::default())));
        let ada = RuleOf::F32(Rule::Adagrad(AdagradScalars::new(
            &AdagradHyper::default(),
            1.0,
        )));
        let mut checked = vec![
            a.checked(DType::F32, &g32, adam, None),
            c.checked(DType::F64, &g64, sgd, None),
            e.checked(DType::Bf16, &gb16, ada, None),
        ];
        // Miri cannot store float16 vector lanes (see `kernels::tests::miri_can_run`), and
        // `execute` runs the active level.
        if !cfg!(miri) {
            checked.push(d.checked(DType::F16, &g16, rms, None));
        }
        let options = Options {
            grad_factor: if pre { GradFactor::default() } else { factor },
            ..Options::default()
        };
        assert!(execute(checked, &options).unwrap());
        vec![a.bits(), c.bits(), d.bits(), e.bits()]
    };
    assert_eq!(run(false), run(true));
}

#[test]
fn a_state_scalar_is_read_and_written_in_its_dtype() {
    let mut narrow = 0.25f32;
    let mut wide = 0.25f64;
    let mut f16 = half::f16::from_f32_const(0.25);
    let mut bf16 = half::bf16::from_f32_const(0.25);
    let ptrs: [(*mut u8, DType); 4] = [
        (std::ptr::from_mut(&mut narrow).cast(), DType::F32),
        (std::ptr::from_mut(&mut wide).cast(), DType::F64),
        (std::ptr::from_mut(&mut f16).cast(), DType::F16),
        (std::ptr::from_mut(&mut bf16).cast(), DType::Bf16),
    ];
    // 1/3: not a float32; float16 and bfloat16 round the float32 value once (half's software
    // conversions: Miri has no F16C).
    let third = 1.0f64 / 3.0;
    for (p, dtype) in ptrs {
        // SAFETY: each pointer is one live, aligned element of its dtype, used alone.
        unsafe {
            assert_eq!(scalar_read(p, dtype), 0.25);
            scalar_slot(p, dtype, third).write();
        }
    }
    assert_eq!(narrow, third as f32);
    assert_eq!(wide, third);
    assert_eq!(f16, half::f16::from_f32_const(third as f32));
    assert_eq!(bf16, half::bf16::from_f32_const(third as f32));
}
