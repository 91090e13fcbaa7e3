//! Reading a param group's hyperparameters out of its Python mapping into the core's [`Hyper`].

use pyo3::prelude::*;
use pyo3::types::{PyComplex, PyFloat, PyInt};

use optirs_core::kernels::adadelta::AdadeltaHyper;
use optirs_core::kernels::adagrad::AdagradHyper;
use optirs_core::kernels::adam::AdamHyper;
use optirs_core::kernels::adamax::AdamaxHyper;
use optirs_core::kernels::asgd::AsgdHyper;
use optirs_core::kernels::lion::LionHyper;
use optirs_core::kernels::nadam::NAdamHyper;
use optirs_core::kernels::radam::RAdamHyper;
use optirs_core::kernels::rmsprop::RmsPropHyper;
use optirs_core::kernels::rprop::RpropHyper;
use optirs_core::kernels::sgd::SgdHyper;
use optirs_core::torch_raises::PyNumbers;
use optirs_core::{CoreError, DType, Hyper, Kind, TorchRaises};

use crate::errors::{type_err, value_err};

/// The hyperparameters of group `gi` of `kind`, read from its mapping.
pub(crate) fn read(kind: Kind, group: &Bound<'_, PyAny>, gi: usize) -> Result<Hyper, CoreError> {
    let g = GroupReader { group, gi };
    Ok(match kind {
        Kind::Sgd => {
            let momentum = g.real("momentum")?;
            Hyper::Sgd(SgdHyper {
                lr: g.real("lr")?,
                momentum,
                // As torch.optim.SGD: without momentum, dampening is never looked at.
                dampening: if momentum == 0.0 {
                    0.0
                } else {
                    g.real("dampening")?
                },
                weight_decay: g.real("weight_decay")?,
                nesterov: g.flag("nesterov", None)?,
                maximize: g.flag("maximize", Some(false))?,
            })
        }
        Kind::Adam => {
            let [(beta1, py_beta1), (beta2, py_beta2)] = g.pair("betas")?;
            let (lr, py_lr) = g.number("lr")?;
            Hyper::Adam(
                AdamHyper {
                    lr,
                    beta1,
                    beta2,
                    eps: g.real("eps")?,
                    weight_decay: g.real("weight_decay")?,
                    amsgrad: g.flag("amsgrad", Some(false))?,
                    maximize: g.flag("maximize", Some(false))?,
                    decoupled: g.flag("decoupled_weight_decay", Some(false))?,
                },
                PyNumbers {
                    lr: py_lr,
                    betas: [py_beta1, py_beta2],
                    lr_decay: false,
                },
            )
        }
        Kind::RmsProp => Hyper::RmsProp(RmsPropHyper {
            lr: g.real("lr")?,
            alpha: g.real("alpha")?,
            eps: g.real("eps")?,
            weight_decay: g.real("weight_decay")?,
            momentum: g.real("momentum")?,
            centered: g.flag("centered", Some(false))?,
            maximize: g.flag("maximize", Some(false))?,
        }),
        Kind::Adagrad => {
            let (lr, py_lr) = g.number("lr")?;
            let (lr_decay, py_lr_decay) = g.number("lr_decay")?;
            Hyper::Adagrad(
                AdagradHyper {
                    lr,
                    lr_decay,
                    weight_decay: g.real("weight_decay")?,
                    eps: g.real("eps")?,
                    maximize: g.flag("maximize", Some(false))?,
                },
                PyNumbers {
                    lr: py_lr,
                    lr_decay: py_lr_decay,
                    ..PyNumbers::default()
                },
            )
        }
        Kind::Adadelta => g.adadelta()?,
        Kind::RAdam => g.radam()?,
        Kind::Lion => g.lion()?,
        Kind::Rprop => g.rprop()?,
        Kind::Adamax => adamax(&g)?,
        Kind::NAdam => nadam(&g)?,
        Kind::Asgd => asgd(&g)?,
    })
}

/// The dtype group `gi` keeps its state buffers in (`state_dtype`, optirs's own option): None
/// (absent or None: the parameter's dtype, as torch) or bfloat16 (`"bfloat16"`; the Python
/// APIs store `torch.bfloat16` and `ml_dtypes.bfloat16` under that name).
pub(crate) fn state_dtype(group: &Bound<'_, PyAny>, gi: usize) -> Result<Option<DType>, CoreError> {
    let Ok(v) = group.get_item("state_dtype") else {
        return Ok(None);
    };
    if v.is_none() {
        return Ok(None);
    }
    // The Python APIs store the name; a group a user filled in by hand may hold the dtype
    // itself (`torch.bfloat16`, NumPy's dtype of `ml_dtypes.bfloat16`).
    let name = v
        .extract::<String>()
        .or_else(|_| v.str().map(|s| s.to_string()));
    match name.as_deref() {
        Ok("bfloat16" | "torch.bfloat16") => Ok(Some(DType::Bf16)),
        _ => value_err!(
            "param_groups[{gi}]['state_dtype'] must be None or 'bfloat16', got {}",
            v.repr()
                .map_or_else(|_| String::from("?"), |r| r.to_string())
        )
        .map_err(|e: CoreError| e.in_group(gi).arg("state_dtype")),
    }
}

/// The hyperparameters of torch.optim.Adamax's group.
fn adamax(g: &GroupReader<'_, '_>) -> Result<Hyper, CoreError> {
    let (lr, [beta1, beta2], py) = g.lr_and_betas()?;
    Ok(Hyper::Adamax(
        AdamaxHyper {
            lr,
            beta1,
            beta2,
            eps: g.real("eps")?,
            weight_decay: g.real("weight_decay")?,
            maximize: g.flag("maximize", Some(false))?,
        },
        py,
    ))
}

/// The hyperparameters of torch.optim.NAdam's group.
fn nadam(g: &GroupReader<'_, '_>) -> Result<Hyper, CoreError> {
    let (lr, [beta1, beta2], py) = g.lr_and_betas()?;
    Ok(Hyper::NAdam(
        NAdamHyper {
            lr,
            beta1,
            beta2,
            eps: g.real("eps")?,
            weight_decay: g.real("weight_decay")?,
            momentum_decay: g.real("momentum_decay")?,
            decoupled: g.flag("decoupled_weight_decay", Some(false))?,
            maximize: g.flag("maximize", Some(false))?,
        },
        py,
    ))
}

/// The hyperparameters of torch.optim.ASGD's group.
fn asgd(g: &GroupReader<'_, '_>) -> Result<Hyper, CoreError> {
    let (lr, py_lr) = g.number("lr")?;
    let lr_f32 = !py_lr && g.is_float32_tensor("lr");
    Ok(Hyper::Asgd(
        AsgdHyper {
            lr,
            lambd: g.real("lambd")?,
            alpha: g.real("alpha")?,
            t0: g.real("t0")?,
            weight_decay: g.real("weight_decay")?,
            maximize: g.flag("maximize", Some(false))?,
            lr_f32,
        },
        PyNumbers {
            lr: py_lr,
            ..PyNumbers::default()
        },
    ))
}

/// Group `gi`'s stochastic rounding (`bf16_stochastic_round`, optirs's own option): None when
/// off (absent or False), else the generator's `seed` and the group's step count `sr_step`
/// (absent: 0), which key the random bits of this step.
pub(crate) fn stochastic(
    group: &Bound<'_, PyAny>,
    gi: usize,
) -> Result<Option<(u64, u64)>, CoreError> {
    if !flag_entry(group, gi, "bf16_stochastic_round")? {
        return Ok(None);
    }
    let count = |key: &str, absent: Option<u64>| -> Result<u64, CoreError> {
        let v = match group.get_item(key) {
            Ok(v) if !v.is_none() => v,
            _ => {
                return absent.map_or_else(
                    || {
                        value_err!(
                            "param_groups[{gi}] has bf16_stochastic_round=True but no '{key}' \
                             entry"
                        )
                        .map_err(|e: CoreError| e.in_group(gi).arg(key))
                    },
                    Ok,
                )
            }
        };
        if v.is_instance_of::<pyo3::types::PyBool>() || !v.is_instance_of::<PyInt>() {
            return type_err!(
                "param_groups[{gi}]['{key}'] must be an int, got {}",
                crate::ndarray::type_name(&v)
            )
            .map_err(|e: CoreError| e.in_group(gi).arg(key));
        }
        v.extract::<u64>().or_else(|_| {
            value_err!("param_groups[{gi}]['{key}'] must be in [0, 2**64), got {v}")
                .map_err(|e: CoreError| e.in_group(gi).arg(key))
        })
    };
    Ok(Some((count("seed", None)?, count("sr_step", Some(0))?)))
}

/// Whether group `gi` keeps float32 master copies of its 16-bit parameters (`master_weights`).
pub(crate) fn master_weights(group: &Bound<'_, PyAny>, gi: usize) -> Result<bool, CoreError> {
    flag_entry(group, gi, "master_weights")
}

/// A bool entry of optirs's own: absent or None is False; anything but a bool is refused.
fn flag_entry(group: &Bound<'_, PyAny>, gi: usize, key: &str) -> Result<bool, CoreError> {
    match group.get_item(key) {
        Ok(v) if !v.is_none() => v.extract::<bool>().or_else(|_| {
            type_err!(
                "param_groups[{gi}]['{key}'] must be a bool, got {}",
                crate::ndarray::type_name(&v)
            )
            .map_err(|e: CoreError| e.in_group(gi).arg(key))
        }),
        _ => Ok(false),
    }
}

/// How many parameters group `gi` holds.
pub(crate) fn len_params(group: &Bound<'_, PyAny>, gi: usize) -> Result<usize, CoreError> {
    GroupReader { group, gi }.len_params()
}

/// Reads typed values out of one param-group mapping, naming the key in every error (and
/// locating it: the group and the key).
struct GroupReader<'a, 'py> {
    group: &'a Bound<'py, PyAny>,
    gi: usize,
}

impl<'py> GroupReader<'_, 'py> {
    fn locate<T>(&self, key: &str, r: Result<T, CoreError>) -> Result<T, CoreError> {
        r.map_err(|e| e.in_group(self.gi).arg(key))
    }

    fn item(&self, key: &str) -> Result<Bound<'py, PyAny>, CoreError> {
        match self.group.get_item(key) {
            Ok(v) => Ok(v),
            Err(_) => self.locate(
                key,
                value_err!("param_groups[{}] has no '{key}' entry", self.gi),
            ),
        }
    }

    fn to_real(&self, key: &str, v: &Bound<'py, PyAny>) -> Result<f64, CoreError> {
        // Python bools are ints; torch accepts them as numbers too.
        let r = match v.extract::<f64>() {
            Ok(x) => Ok(x),
            Err(_) if v.is_instance_of::<PyInt>() => value_err!(
                "param_groups[{}]['{key}'] is an int too large for a float",
                self.gi
            ),
            // torch.optim's step fails on a complex hyperparameter in a tensor operation
            // ("For non-complex input tensors, argument alpha must not be a complex number.",
            // "value cannot be converted to type float without overflow", ...): RuntimeError.
            Err(_) if v.is_instance_of::<PyComplex>() => Err(CoreError::torch(
                TorchRaises::Runtime,
                format!(
                    "param_groups[{}]['{key}'] must be a real number, got complex {}",
                    self.gi,
                    v.repr().map_or_else(|_| String::new(), |r| r.to_string())
                ),
            )),
            Err(_) => type_err!(
                "param_groups[{}]['{key}'] must be a real number, got {}",
                self.gi,
                crate::ndarray::type_name(v)
            ),
        };
        self.locate(key, r)
    }

    fn real(&self, key: &str) -> Result<f64, CoreError> {
        let v = self.item(key)?;
        self.to_real(key, &v)
    }

    /// A real value, and whether it is a Python number (see [`PyNumbers`]).
    fn number(&self, key: &str) -> Result<(f64, bool), CoreError> {
        let v = self.item(key)?;
        Ok((self.to_real(key, &v)?, is_py_number(&v)))
    }

    /// Two real values, each with whether it is a Python number.
    fn pair(&self, key: &str) -> Result<[(f64, bool); 2], CoreError> {
        let v = self.item(key)?;
        let bad = || {
            self.locate(
                key,
                type_err!(
                    "param_groups[{}]['{key}'] must be a pair of floats",
                    self.gi
                ),
            )
        };
        if v.len().ok() != Some(2) {
            return bad();
        }
        let (Ok(a), Ok(b)) = (v.get_item(0), v.get_item(1)) else {
            return bad();
        };
        Ok([
            (self.to_real(key, &a)?, is_py_number(&a)),
            (self.to_real(key, &b)?, is_py_number(&b)),
        ])
    }

    /// `betas` then `lr`, and which of them are Python numbers.
    fn lr_and_betas(&self) -> Result<(f64, [f64; 2], PyNumbers), CoreError> {
        let [(beta1, py_beta1), (beta2, py_beta2)] = self.pair("betas")?;
        let (lr, py_lr) = self.number("lr")?;
        let py = PyNumbers {
            lr: py_lr,
            betas: [py_beta1, py_beta2],
            lr_decay: false,
        };
        Ok((lr, [beta1, beta2], py))
    }

    /// Whether the value is a torch float32 tensor (its arithmetic in torch's step is float32).
    fn is_float32_tensor(&self, key: &str) -> bool {
        self.group
            .get_item(key)
            .and_then(|v| v.getattr("dtype"))
            .and_then(|d| d.str().map(|s| s.to_string()))
            .is_ok_and(|s| s == "torch.float32")
    }

    /// A truthy option; `default` is used when the key is absent (older state dicts).
    fn flag(&self, key: &str, default: Option<bool>) -> Result<bool, CoreError> {
        let r = match (self.group.get_item(key), default) {
            (Ok(v), _) => match v.is_truthy() {
                Ok(b) => Ok(b),
                Err(_) => type_err!("param_groups[{}]['{key}'] must be a bool", self.gi),
            },
            (Err(_), Some(d)) => Ok(d),
            (Err(_), None) => value_err!("param_groups[{}] has no '{key}' entry", self.gi),
        };
        self.locate(key, r)
    }

    fn adadelta(&self) -> Result<Hyper, CoreError> {
        Ok(Hyper::Adadelta(AdadeltaHyper {
            lr: self.real("lr")?,
            rho: self.real("rho")?,
            eps: self.real("eps")?,
            weight_decay: self.real("weight_decay")?,
            maximize: self.flag("maximize", Some(false))?,
        }))
    }

    fn radam(&self) -> Result<Hyper, CoreError> {
        let [(beta1, py_beta1), (beta2, py_beta2)] = self.pair("betas")?;
        let (lr, py_lr) = self.number("lr")?;
        Ok(Hyper::RAdam(
            RAdamHyper {
                lr,
                beta1,
                beta2,
                eps: self.real("eps")?,
                weight_decay: self.real("weight_decay")?,
                decoupled: self.flag("decoupled_weight_decay", Some(false))?,
                maximize: self.flag("maximize", Some(false))?,
            },
            PyNumbers {
                lr: py_lr,
                betas: [py_beta1, py_beta2],
                lr_decay: false,
            },
        ))
    }

    fn lion(&self) -> Result<Hyper, CoreError> {
        let [(beta1, _), (beta2, _)] = self.pair("betas")?;
        Ok(Hyper::Lion(LionHyper {
            lr: self.real("lr")?,
            beta1,
            beta2,
            weight_decay: self.real("weight_decay")?,
            maximize: self.flag("maximize", Some(false))?,
        }))
    }

    fn rprop(&self) -> Result<Hyper, CoreError> {
        let [(etaminus, _), (etaplus, _)] = self.pair("etas")?;
        let [(step_size_min, _), (step_size_max, _)] = self.pair("step_sizes")?;
        Ok(Hyper::Rprop(RpropHyper {
            lr: self.real("lr")?,
            etaminus,
            etaplus,
            step_size_min,
            step_size_max,
            maximize: self.flag("maximize", Some(false))?,
        }))
    }

    fn len_params(&self) -> Result<usize, CoreError> {
        match self.item("params")?.len() {
            Ok(n) => Ok(n),
            Err(_) => self.locate(
                "params",
                type_err!("param_groups[{}]['params'] must be a list", self.gi),
            ),
        }
    }
}

/// A `float` (not a subclass: NumPy's float64 is one, with NumPy's arithmetic) or an `int`
/// (`bool` included), whose arithmetic in torch.optim's step is Python's.
fn is_py_number(v: &Bound<'_, PyAny>) -> bool {
    v.is_exact_instance_of::<PyFloat>() || v.is_instance_of::<PyInt>()
}

/// Group `gi`'s Adafactor hyperparameters (`lr`, `beta2_decay`, `eps` = `(eps1 or None, eps2)`,
/// `d`, `weight_decay`, `maximize`).
pub(crate) fn adafactor(
    group: &Bound<'_, PyAny>,
    gi: usize,
) -> Result<optirs_core::adafactor::Hyper, CoreError> {
    let g = GroupReader { group, gi };
    let eps = g.item("eps")?;
    let bad = || {
        g.locate(
            "eps",
            type_err!("param_groups[{gi}]['eps'] must be a pair (eps1 or None, eps2) of floats"),
        )
    };
    if eps.len().ok() != Some(2) {
        return bad();
    }
    let (Ok(e1), Ok(e2)) = (eps.get_item(0), eps.get_item(1)) else {
        return bad();
    };
    let eps1 = if e1.is_none() {
        None
    } else {
        Some(g.to_real("eps", &e1)?)
    };
    Ok(optirs_core::adafactor::Hyper {
        lr: g.real("lr")?,
        beta2_decay: g.real("beta2_decay")?,
        eps1,
        eps2: g.to_real("eps", &e2)?,
        d: g.real("d")?,
        weight_decay: g.real("weight_decay")?,
        maximize: g.flag("maximize", Some(false))?,
    })
}
