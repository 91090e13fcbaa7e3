//! The rule table: the update rules, the state buffers each reads and writes (in the order the
//! kernels take them) and whether it counts steps, known here once; a param group's
//! hyperparameters ([`Hyper`]) and the per-step scalars computed from them ([`RuleMemo`]).
//!
//! The bindings export [`RULES`] to Python (`optirs._core.RULES`), where a test checks it
//! against `optirs._spec`, the Python side's one declaration of each optimizer.

use crate::dtype::DType;
use crate::engine::{scalar_read, scalar_slot, CounterSlot};
use crate::error::CoreError;
use crate::kernels::adadelta::{AdadeltaHyper, AdadeltaScalars};
use crate::kernels::adagrad::{AdagradHyper, AdagradScalars};
use crate::kernels::adam::{AdamHyper, AdamScalars};
use crate::kernels::adamax::{AdamaxHyper, AdamaxScalars};
use crate::kernels::asgd::{AsgdHyper, AsgdScalars};
use crate::kernels::lion::{LionHyper, LionScalars};
use crate::kernels::nadam::{NAdamHyper, NAdamScalars};
use crate::kernels::radam::{RAdamHyper, RAdamScalars};
use crate::kernels::rmsprop::{RmsPropHyper, RmsPropScalars};
use crate::kernels::rprop::{RpropHyper, RpropScalars};
use crate::kernels::sgd::{SgdHyper, SgdScalars};
use crate::kernels::{Float, Rule};
use crate::torch_raises::{self, PyNumbers};
use crate::value_err;

/// Which update rule a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sgd,
    Adam,
    RmsProp,
    Adagrad,
    Adadelta,
    RAdam,
    Lion,
    Rprop,
    Adamax,
    NAdam,
    Asgd,
}

/// One row of the rule table.
#[derive(Clone, Copy, Debug)]
pub struct RuleSpec {
    pub kind: Kind,
    /// Its name in `optirs._core.step` and `optirs._spec` (`Spec.kind`).
    pub name: &'static str,
    /// The state buffers, in the order the kernels take them (`Slices::bufs`).
    pub buffers: &'static [&'static str],
    /// Whether it keeps a 0-d `step` counter (SGD does not).
    pub counts_steps: bool,
    /// Its per-parameter 0-d state besides `step` (NAdam's `mu_product`), in the order the
    /// bindings hand them over: after the buffers, in the same tuple. Each is read before the
    /// step (`.item()`) and given its new value ([`Hyper::scalars_after`]) with the counter.
    pub scalars: &'static [&'static str],
}

/// The most per-parameter 0-d state values a rule keeps besides `step`.
pub const MAX_SCALARS: usize = 2;

/// The rule table, in `Kind` order.
pub const RULES: [RuleSpec; 11] = [
    RuleSpec {
        kind: Kind::Sgd,
        name: "sgd",
        buffers: &["momentum_buffer"],
        counts_steps: false,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::Adam,
        name: "adam",
        buffers: &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        counts_steps: true,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::RmsProp,
        name: "rmsprop",
        buffers: &["square_avg", "momentum_buffer", "grad_avg"],
        counts_steps: true,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::Adagrad,
        name: "adagrad",
        buffers: &["sum"],
        counts_steps: true,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::Adadelta,
        name: "adadelta",
        buffers: &["square_avg", "acc_delta"],
        counts_steps: true,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::RAdam,
        name: "radam",
        buffers: &["exp_avg", "exp_avg_sq"],
        counts_steps: true,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::Lion,
        name: "lion",
        buffers: &["exp_avg"],
        counts_steps: false,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::Rprop,
        name: "rprop",
        buffers: &["prev", "step_size"],
        counts_steps: true,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::Adamax,
        name: "adamax",
        buffers: &["exp_avg", "exp_inf"],
        counts_steps: true,
        scalars: &[],
    },
    RuleSpec {
        kind: Kind::NAdam,
        name: "nadam",
        buffers: &["exp_avg", "exp_avg_sq"],
        counts_steps: true,
        scalars: &["mu_product"],
    },
    RuleSpec {
        kind: Kind::Asgd,
        name: "asgd",
        buffers: &["ax"],
        counts_steps: true,
        scalars: &["eta", "mu"],
    },
];

impl Kind {
    /// The kind named `s` (a `name` of [`RULES`]: `"sgd"`, `"adam"`, ..., `"rprop"`).
    ///
    /// # Errors
    /// `ValueError` for any other name.
    pub fn parse(s: &str) -> Result<Kind, CoreError> {
        match RULES.iter().find(|r| r.name == s) {
            Some(r) => Ok(r.kind),
            None => {
                value_err!("unknown optimizer kind {s:?}").map_err(|e: CoreError| e.arg("kind"))
            }
        }
    }

    /// Its row of the rule table.
    #[must_use]
    pub fn spec(self) -> &'static RuleSpec {
        &RULES[self as usize]
    }

    /// The state buffers, in the order the kernels take them.
    #[must_use]
    pub fn buffer_names(self) -> &'static [&'static str] {
        self.spec().buffers
    }

    /// SGD and Lion keep no step counter; the others keep a 0-d float32 `step`.
    #[must_use]
    pub fn counts_steps(self) -> bool {
        self.spec().counts_steps
    }

    /// Its per-parameter 0-d state besides `step`, in the order the bindings hand it over.
    #[must_use]
    pub fn scalar_names(self) -> &'static [&'static str] {
        self.spec().scalars
    }
}

/// The hyperparameters of one param group.
#[derive(Clone, Copy, Debug)]
pub enum Hyper {
    Sgd(SgdHyper),
    Adam(AdamHyper, PyNumbers),
    RmsProp(RmsPropHyper),
    Adagrad(AdagradHyper, PyNumbers),
    Adadelta(AdadeltaHyper),
    RAdam(RAdamHyper, PyNumbers),
    Lion(LionHyper),
    Rprop(RpropHyper),
    Adamax(AdamaxHyper, PyNumbers),
    NAdam(NAdamHyper, PyNumbers),
    Asgd(AsgdHyper, PyNumbers),
}

impl Hyper {
    /// Which of the kind's buffers this group's options use.
    #[must_use]
    pub fn needs(&self) -> [bool; 3] {
        match self {
            Hyper::Sgd(h) => [h.momentum != 0.0, false, false],
            Hyper::Adam(h, _) => [true, true, h.amsgrad],
            Hyper::RmsProp(h) => [true, h.momentum > 0.0, h.centered],
            Hyper::Adagrad(..) | Hyper::Lion(..) | Hyper::Asgd(..) => [true, false, false],
            Hyper::Adadelta(..)
            | Hyper::RAdam(..)
            | Hyper::Rprop(..)
            | Hyper::Adamax(..)
            | Hyper::NAdam(..) => [true, true, false],
        }
    }

    /// The per-parameter scalar state (`RuleSpec::scalars`) once this step has run, from its
    /// stored values `old` of dtypes `dtypes`, computed as torch computes it for such a 0-d
    /// tensor (what [`crate::engine::scalar_slot`] stores). `step`: the count after this
    /// step's increment.
    #[must_use]
    pub fn scalars_after(
        &self,
        step: f64,
        old: [f64; MAX_SCALARS],
        dtypes: [DType; MAX_SCALARS],
    ) -> [f64; MAX_SCALARS] {
        match self {
            Hyper::NAdam(h, _) => [
                h.mu_product_after(step, old[0], dtypes[0] == DType::F64),
                0.0,
            ],
            // Whatever the stored dtype: `torch.as_tensor` of a Python float is float32.
            Hyper::Asgd(h, _) => [h.eta_after(step), h.mu_after(step)],
            _ => [0.0; MAX_SCALARS],
        }
    }

    /// `scalars`: the per-parameter scalar state before this step and after it.
    fn rule<T: Float>(&self, step: f64, fresh: bool, scalars: [[f64; MAX_SCALARS]; 2]) -> Rule<T> {
        let [before, after] = scalars;
        match self {
            Hyper::Sgd(h) => Rule::Sgd(SgdScalars::new(h, fresh)),
            Hyper::Adam(h, _) => Rule::Adam(AdamScalars::new(h, step)),
            Hyper::RmsProp(h) => Rule::RmsProp(RmsPropScalars::new(h)),
            Hyper::Adagrad(h, _) => Rule::Adagrad(AdagradScalars::new(h, step)),
            Hyper::Adadelta(h) => Rule::Adadelta(AdadeltaScalars::new(h)),
            Hyper::RAdam(h, _) => Rule::RAdam(RAdamScalars::new(h, step)),
            Hyper::Lion(h) => Rule::Lion(LionScalars::new(h)),
            Hyper::Rprop(h) => Rule::Rprop(RpropScalars::new(h)),
            Hyper::Adamax(h, _) => Rule::Adamax(AdamaxScalars::new(h, step)),
            Hyper::NAdam(h, _) => Rule::NAdam(NAdamScalars::new(h, step, after[0])),
            Hyper::Asgd(h, _) => Rule::Asgd(AsgdScalars::new(h, before[0], before[1])),
        }
    }
}

/// The per-step scalars, in the compute type of the parameter's dtype.
#[derive(Clone, Copy)]
pub enum RuleOf {
    F32(Rule<f32>),
    F64(Rule<f64>),
}

/// The last per-step scalars computed: the parameters of one group usually share their step
/// count, so their bias corrections (three `pow` calls for Adam) are computed, and checked
/// against what torch.optim's step would raise (`torch_raises`), once.
#[derive(Default)]
pub struct RuleMemo {
    last: Option<(usize, DType, u64, bool, RuleOf)>,
    /// For rules with per-parameter scalar state: the key (group, dtype, count, fresh, the
    /// scalars' bits and dtypes) and what it gave.
    #[allow(clippy::type_complexity)]
    last_scalars: Option<(MemoKey, RuleOf, [f64; MAX_SCALARS])>,
}

type MemoKey = (
    usize,
    DType,
    u64,
    bool,
    [u64; MAX_SCALARS],
    [DType; MAX_SCALARS],
);

impl RuleMemo {
    /// The scalars of group `group` (hyperparameters `hyper`) for a parameter of `dtype` at
    /// step count `count` (once incremented); `fresh`: SGD's momentum buffer is made from this
    /// gradient.
    ///
    /// # Errors
    /// What torch.optim's step raises for these hyperparameters (see `torch_raises`).
    pub fn get(
        &mut self,
        group: usize,
        hyper: &Hyper,
        dtype: DType,
        count: f64,
        fresh: bool,
    ) -> Result<RuleOf, CoreError> {
        // Keyed by dtype, not only by compute type: the range checks of `torch_raises` differ
        // between float16, bfloat16 and float32.
        let key = (group, dtype, count.to_bits(), fresh);
        if let Some((g, d, c, f, rule)) = self.last {
            if (g, d, c, f) == key {
                return Ok(rule);
            }
        }
        torch_raises::check(hyper, group, count, dtype, fresh)?;
        let rule = hyper.rule_of(dtype, count, fresh, [[0.0; MAX_SCALARS]; 2]);
        self.last = Some((key.0, key.1, key.2, key.3, rule));
        Ok(rule)
    }

    /// As [`RuleMemo::get`], for a rule with per-parameter scalar state: `scalars` holds each
    /// one's stored value and dtype (unused entries: anything). Returns the scalars too, and
    /// the values the scalars take once the step has run ([`Hyper::scalars_after`]).
    ///
    /// # Errors
    /// As [`RuleMemo::get`].
    pub fn get_with_scalars(
        &mut self,
        group: usize,
        hyper: &Hyper,
        dtype: DType,
        count: f64,
        fresh: bool,
        scalars: [(f64, DType); MAX_SCALARS],
    ) -> Result<(RuleOf, [f64; MAX_SCALARS]), CoreError> {
        let old = scalars.map(|s| s.0);
        let dtypes = scalars.map(|s| s.1);
        let key = (
            group,
            dtype,
            count.to_bits(),
            fresh,
            old.map(f64::to_bits),
            dtypes,
        );
        if let Some((k, rule, after)) = self.last_scalars {
            if k == key {
                return Ok((rule, after));
            }
        }
        let after = hyper.scalars_after(count, old, dtypes);
        torch_raises::check_with_scalars(hyper, group, count, dtype, fresh, [old, after])?;
        let rule = hyper.rule_of(dtype, count, fresh, [old, after]);
        self.last_scalars = Some((key, rule, after));
        Ok((rule, after))
    }

    /// [`RuleMemo::get`] when `scalars` is all `None`, else [`RuleMemo::get_with_scalars`]
    /// with each scalar state value read at its address, and the slots where their new values
    /// go once the step has run.
    ///
    /// # Errors
    /// As [`RuleMemo::get`].
    ///
    /// # Safety
    /// Each `Some` of `scalars` meets [`scalar_slot`]'s contract.
    #[allow(clippy::type_complexity)]
    pub unsafe fn get_at(
        &mut self,
        group: usize,
        hyper: &Hyper,
        dtype: DType,
        count: f64,
        fresh: bool,
        scalars: [Option<(*mut u8, DType)>; MAX_SCALARS],
    ) -> Result<(RuleOf, [Option<CounterSlot<'static>>; MAX_SCALARS]), CoreError> {
        if scalars.iter().all(Option::is_none) {
            return Ok((self.get(group, hyper, dtype, count, fresh)?, [None, None]));
        }
        // SAFETY: the caller's contract.
        let values = scalars.map(|s| {
            s.map_or((f64::NAN, DType::F32), |(p, dt)| {
                (unsafe { scalar_read(p, dt) }, dt)
            })
        });
        let (rule, after) = self.get_with_scalars(group, hyper, dtype, count, fresh, values)?;
        let mut slots = [None, None];
        for (j, s) in scalars.into_iter().enumerate() {
            // SAFETY: the caller's contract.
            slots[j] = s.map(|(p, dt)| unsafe { scalar_slot(p, dt, after[j]) });
        }
        Ok((rule, slots))
    }
}

impl Hyper {
    fn rule_of(
        &self,
        dtype: DType,
        count: f64,
        fresh: bool,
        scalars: [[f64; MAX_SCALARS]; 2],
    ) -> RuleOf {
        if dtype == DType::F64 {
            RuleOf::F64(self.rule(count, fresh, scalars))
        } else {
            RuleOf::F32(self.rule(count, fresh, scalars))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_table_is_in_kind_order_and_parses_its_names() {
        for (i, r) in RULES.iter().enumerate() {
            assert_eq!(r.kind as usize, i);
            assert_eq!(Kind::parse(r.name), Ok(r.kind));
            assert!(r.buffers.len() <= 3, "the kernels take at most 3 buffers");
            assert!(
                r.scalars.len() <= MAX_SCALARS,
                "at most MAX_SCALARS 0-d state values"
            );
            assert!(
                r.counts_steps || r.scalars.is_empty(),
                "0-d state goes with a counter"
            );
        }
        assert_eq!(
            Kind::parse("lbfgs").unwrap_err().arg.as_deref(),
            Some("kind")
        );
    }
}
