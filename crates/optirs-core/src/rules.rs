//! The rule table: the update rules, the state buffers each reads and writes (in the order the
//! kernels take them) and whether it counts steps, known here once; a param group's
//! hyperparameters ([`Hyper`]) and the per-step scalars computed from them ([`RuleMemo`]).
//!
//! The bindings export [`RULES`] to Python (`optirs._core.RULES`), where a test checks it
//! against `optirs._spec`, the Python side's one declaration of each optimizer.

use crate::dtype::DType;
use crate::error::CoreError;
use crate::kernels::adagrad::{AdagradHyper, AdagradScalars};
use crate::kernels::adam::{AdamHyper, AdamScalars};
use crate::kernels::adamax::{AdamaxHyper, AdamaxScalars};
use crate::kernels::rmsprop::{RmsPropHyper, RmsPropScalars};
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
    Adamax,
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
}

/// The rule table, in `Kind` order.
pub const RULES: [RuleSpec; 5] = [
    RuleSpec {
        kind: Kind::Sgd,
        name: "sgd",
        buffers: &["momentum_buffer"],
        counts_steps: false,
    },
    RuleSpec {
        kind: Kind::Adam,
        name: "adam",
        buffers: &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        counts_steps: true,
    },
    RuleSpec {
        kind: Kind::RmsProp,
        name: "rmsprop",
        buffers: &["square_avg", "momentum_buffer", "grad_avg"],
        counts_steps: true,
    },
    RuleSpec {
        kind: Kind::Adagrad,
        name: "adagrad",
        buffers: &["sum"],
        counts_steps: true,
    },
    RuleSpec {
        kind: Kind::Adamax,
        name: "adamax",
        buffers: &["exp_avg", "exp_inf"],
        counts_steps: true,
    },
];

impl Kind {
    /// The kind named `s` (`"sgd"`, `"adam"`, `"rmsprop"`, `"adagrad"`).
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

    /// SGD keeps no step counter; the others keep a 0-d float32 `step`.
    #[must_use]
    pub fn counts_steps(self) -> bool {
        self.spec().counts_steps
    }
}

/// The hyperparameters of one param group.
#[derive(Clone, Copy, Debug)]
pub enum Hyper {
    Sgd(SgdHyper),
    Adam(AdamHyper, PyNumbers),
    RmsProp(RmsPropHyper),
    Adagrad(AdagradHyper, PyNumbers),
    Adamax(AdamaxHyper, PyNumbers),
}

impl Hyper {
    /// Which of the kind's buffers this group's options use.
    #[must_use]
    pub fn needs(&self) -> [bool; 3] {
        match self {
            Hyper::Sgd(h) => [h.momentum != 0.0, false, false],
            Hyper::Adam(h, _) => [true, true, h.amsgrad],
            Hyper::RmsProp(h) => [true, h.momentum > 0.0, h.centered],
            Hyper::Adagrad(..) => [true, false, false],
            Hyper::Adamax(..) => [true, true, false],
        }
    }

    fn rule<T: Float>(&self, step: f64, fresh: bool) -> Rule<T> {
        match self {
            Hyper::Sgd(h) => Rule::Sgd(SgdScalars::new(h, fresh)),
            Hyper::Adam(h, _) => Rule::Adam(AdamScalars::new(h, step)),
            Hyper::RmsProp(h) => Rule::RmsProp(RmsPropScalars::new(h)),
            Hyper::Adagrad(h, _) => Rule::Adagrad(AdagradScalars::new(h, step)),
            Hyper::Adamax(h, _) => Rule::Adamax(AdamaxScalars::new(h, step)),
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
}

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
        let rule = if dtype == DType::F64 {
            RuleOf::F64(hyper.rule(count, fresh))
        } else {
            RuleOf::F32(hyper.rule(count, fresh))
        };
        self.last = Some((key.0, key.1, key.2, key.3, rule));
        Ok(rule)
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
        }
        assert_eq!(
            Kind::parse("lbfgs").unwrap_err().arg.as_deref(),
            Some("kind")
        );
    }
}
