//! Where torch.optim's own step raises for a param group's hyperparameters, and what.
//!
//! torch.optim validates hyperparameters in its constructors only, and steps with whatever a
//! scheduler or the user sets later. Its for-loop step (the default on the CPU) then fails
//! part-way through its update in two ways, which optirs reproduces before writing anything:
//!
//! - Python's float arithmetic on the hyperparameters fails where IEEE arithmetic would give
//!   infinity or NaN: Adam divides lr by `1 - beta1 ** step` (ZeroDivisionError when it is 0),
//!   raises the betas to the step count (OverflowError when out of range) and takes the square
//!   root of `1 - beta2 ** step` (a complex number when negative, which a real tensor then
//!   refuses); Adagrad divides lr by `1 + (step - 1) * lr_decay`. Only where the operands are
//!   Python numbers: with a tensor or NumPy scalar the same formula gives infinity or NaN, as
//!   the kernels do.
//! - A tensor operation converts each scalar argument to the tensor's type and refuses a finite
//!   value out of its range (`RuntimeError: value cannot be converted to type float without
//!   overflow`), e.g. `lr = 1e300` with float32 parameters.
//!
//! Everything else (negative learning rates, betas of 1 or above, NaN, infinities) torch steps
//! with, and so do the kernels.

use crate::dtype::DType;
use crate::error::{CoreError, TorchRaises};
use crate::kernels::adadelta::AdadeltaHyper;
use crate::kernels::adagrad::AdagradHyper;
use crate::kernels::adam::AdamHyper;
use crate::kernels::adamax::AdamaxHyper;
use crate::kernels::asgd::{AsgdHyper, EtaPower};
use crate::kernels::nadam::NAdamHyper;
use crate::kernels::radam::RAdamHyper;
use crate::kernels::rmsprop::RmsPropHyper;
use crate::kernels::rprop::RpropHyper;
use crate::kernels::sgd::SgdHyper;
use crate::rules::{Hyper, MAX_SCALARS};

/// Which hyperparameters are Python numbers (`float` or `int`), whose arithmetic in torch's
/// step is Python's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyNumbers {
    pub lr: bool,
    pub betas: [bool; 2],
    pub lr_decay: bool,
}

/// What torch.optim's for-loop step raises for group `gi` at step count `step` (the count once
/// incremented) with a parameter of `dtype`; `fresh`: SGD's momentum buffer is made from this
/// gradient. Nothing depends on the parameter's values.
///
/// # Errors
/// The exception torch's step raises, located at group `gi`.
pub fn check(
    hyper: &Hyper,
    gi: usize,
    step: f64,
    dtype: DType,
    fresh: bool,
) -> Result<(), CoreError> {
    check_with_scalars(hyper, gi, step, dtype, fresh, [[f64::NAN; MAX_SCALARS]; 2])
}

/// As [`check`], for a rule with per-parameter scalar state (`RuleSpec::scalars`): `scalars`
/// holds their values before this step (ASGD's `eta`, which torch hands to a tensor
/// operation) and after it (NAdam's `mu_product`, which torch's step divides by).
///
/// # Errors
/// As [`check`].
pub fn check_with_scalars(
    hyper: &Hyper,
    gi: usize,
    step: f64,
    dtype: DType,
    fresh: bool,
    scalars: [[f64; MAX_SCALARS]; 2],
) -> Result<(), CoreError> {
    let [before, after] = scalars;
    let at = Scalars { gi, dtype };
    match hyper {
        Hyper::Sgd(h) => at.sgd(h, fresh),
        Hyper::Adam(h, py) => at.adam(h, *py, step),
        Hyper::RmsProp(h) => at.rmsprop(h),
        Hyper::Adagrad(h, py) => at.adagrad(h, *py, step),
        Hyper::Adadelta(h) => at.adadelta(h),
        Hyper::RAdam(h, py) => at.radam(h, *py, step),
        // No torch.optim.Lion: what its reference's operations raise is not a contract.
        Hyper::Lion(_) => Ok(()),
        Hyper::Rprop(h) => at.rprop(h),
        Hyper::Adamax(h, py) => at.adamax(h, *py, step),
        Hyper::NAdam(h, py) => at.nadam(h, *py, step, after[0]),
        Hyper::Asgd(h, py) => at.asgd(h, *py, step, before[0]),
    }
    .map_err(|e| e.in_group(gi))
}

/// How torch hands a Python scalar to a tensor operation.
#[derive(Clone, Copy)]
enum Arg {
    /// `add`'s `alpha`: converted to the tensor's dtype.
    Alpha,
    /// `addcmul`'s and `addcdiv`'s `value`, `lerp`'s `weight`: converted to the compute type
    /// (float32 for float32, float16 and bfloat16 tensors).
    Value,
}

/// `base ** exp` as a Python float power, for the finite exponents used here (a step count).
enum PyPow {
    Real(f64),
    /// A negative base and a fractional exponent: Python returns a complex number.
    Complex,
    /// A finite base whose power is out of range: Python raises OverflowError.
    Overflow,
}

fn python_pow(base: f64, exp: f64) -> PyPow {
    let r = base.powf(exp);
    if base.is_finite() && base < 0.0 && exp.fract() != 0.0 {
        PyPow::Complex
    } else if base.is_finite() && r.is_infinite() {
        PyPow::Overflow
    } else {
        PyPow::Real(r)
    }
}

fn fail(raises: TorchRaises, message: String) -> Result<(), CoreError> {
    Err(CoreError::torch(raises, message))
}

/// The group and the parameter's dtype, for the checks and their messages.
struct Scalars {
    gi: usize,
    dtype: DType,
}

impl Scalars {
    /// torch's conversion of scalar `x` (`expr`, computed from the group's `key`).
    fn convert(&self, x: f64, arg: Arg, key: &str, expr: &str) -> Result<(), CoreError> {
        let (max, ty) = match (self.dtype, arg) {
            // float64 holds any Python float.
            (DType::F64, _) => return Ok(()),
            (DType::F16, Arg::Alpha) => (65504.0, "c10::Half"),
            (DType::Bf16, Arg::Alpha) => (f64::from(half::bf16::MAX.to_f32()), "c10::BFloat16"),
            _ => (f64::from(f32::MAX), "float"),
        };
        // Infinity and NaN convert; only a finite value out of range is refused.
        if !(x.is_finite() && x.abs() > max) {
            return Ok(());
        }
        let tensor = match self.dtype {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::Bf16 => "bfloat16",
        };
        fail(
            TorchRaises::Runtime,
            format!(
                "value cannot be converted to type {ty} without overflow: \
                 param_groups[{}]['{key}'] makes {expr} = {x:?}, which torch.optim passes to a \
                 {tensor} tensor operation",
                self.gi
            ),
        )
    }

    fn weight_decay(&self, weight_decay: f64) -> Result<(), CoreError> {
        if weight_decay == 0.0 {
            return Ok(());
        }
        self.convert(weight_decay, Arg::Alpha, "weight_decay", "weight_decay")
    }

    fn sgd(&self, h: &SgdHyper, fresh: bool) -> Result<(), CoreError> {
        self.weight_decay(h.weight_decay)?;
        if h.momentum != 0.0 && !fresh {
            self.convert(1.0 - h.dampening, Arg::Alpha, "dampening", "1 - dampening")?;
        }
        if h.momentum != 0.0 && h.nesterov {
            self.convert(h.momentum, Arg::Alpha, "momentum", "momentum")?;
        }
        self.convert(-h.lr, Arg::Alpha, "lr", "-lr")
    }

    /// In torch's order: the weight decay, the moments' weights, `beta1 ** step`,
    /// `beta2 ** step`, `lr / (1 - beta1 ** step)`, and the update, which meets the square root
    /// of `1 - beta2 ** step` and the step size.
    fn adam(&self, h: &AdamHyper, py: PyNumbers, step: f64) -> Result<(), CoreError> {
        let gi = self.gi;
        if !h.decoupled {
            self.weight_decay(h.weight_decay)?;
        }
        self.convert(1.0 - h.beta1, Arg::Value, "betas", "1 - betas[0]")?;
        self.convert(1.0 - h.beta2, Arg::Value, "betas", "1 - betas[1]")?;
        let mut complex = [false; 2];
        let mut corrections = [0.0; 2];
        for (i, beta) in [h.beta1, h.beta2].into_iter().enumerate() {
            let power = if py.betas[i] {
                python_pow(beta, step)
            } else {
                PyPow::Real(beta.powf(step))
            };
            match power {
                PyPow::Real(x) => corrections[i] = 1.0 - x,
                PyPow::Complex => complex[i] = true,
                PyPow::Overflow => {
                    return fail(
                        TorchRaises::Overflow,
                        format!(
                            "(34, 'Numerical result out of range'): \
                             param_groups[{gi}]['betas'][{i}] = {beta:?} raised to the step \
                             count {step} is out of a float's range"
                        ),
                    );
                }
            }
        }
        if py.lr && py.betas[0] && !complex[0] && corrections[0] == 0.0 {
            return fail(
                TorchRaises::ZeroDivision,
                format!(
                    "float division by zero: param_groups[{gi}]['betas'][0] = {:?} makes the \
                     bias correction 1 - beta1 ** step zero at step {step}, and torch.optim \
                     divides lr by it",
                    h.beta1
                ),
            );
        }
        let negative = corrections[1] < 0.0 && corrections[1].is_finite();
        if py.betas[1] && (complex[1] || negative) {
            let (raises, torch_message) = match self.dtype {
                DType::F32 => (
                    TorchRaises::Runtime,
                    "result type ComplexFloat can't be cast to the desired output type Float",
                ),
                DType::F64 => (
                    TorchRaises::Runtime,
                    "result type ComplexDouble can't be cast to the desired output type Double",
                ),
                DType::F16 => (
                    TorchRaises::NotImplemented,
                    "\"div_cpu\" not implemented for 'ComplexHalf'",
                ),
                DType::Bf16 => (
                    TorchRaises::NotImplemented,
                    "\"div_cpu\" not implemented for 'BComplex32'",
                ),
            };
            return fail(
                raises,
                format!(
                    "{torch_message}: param_groups[{gi}]['betas'][1] = {:?} makes the bias \
                     correction 1 - beta2 ** step negative at step {step}, and torch.optim \
                     takes its square root in Python floats (a complex number)",
                    h.beta2
                ),
            );
        }
        if complex[0] {
            let ty = if self.dtype == DType::F64 {
                "double"
            } else {
                "float"
            };
            return fail(
                TorchRaises::Runtime,
                format!(
                    "value cannot be converted to type {ty} without overflow: \
                     param_groups[{gi}]['betas'][0] = {:?} raised to the step count {step} is a \
                     complex number in Python",
                    h.beta1
                ),
            );
        }
        self.convert(
            -h.lr / corrections[0],
            Arg::Value,
            "lr",
            "-lr / (1 - beta1 ** step)",
        )
    }

    fn rmsprop(&self, h: &RmsPropHyper) -> Result<(), CoreError> {
        self.weight_decay(h.weight_decay)?;
        self.convert(1.0 - h.alpha, Arg::Value, "alpha", "1 - alpha")?;
        // With momentum the update is `add(buf, alpha=-lr)`, without `addcdiv(value=-lr)`.
        let arg = if h.momentum > 0.0 {
            Arg::Alpha
        } else {
            Arg::Value
        };
        self.convert(-h.lr, arg, "lr", "-lr")
    }

    /// In torch's order: the weight decay, the first moment's weight, `beta1 ** step`,
    /// `lr / (1 - beta1 ** step)` and the update's value. `exp_inf.mul_(beta2)` and
    /// `add_(eps)` take any float (infinity where out of range).
    fn adamax(&self, h: &AdamaxHyper, py: PyNumbers, step: f64) -> Result<(), CoreError> {
        self.weight_decay(h.weight_decay)?;
        self.convert(1.0 - h.beta1, Arg::Value, "betas", "1 - betas[0]")?;
        let correction = self.bias_correction1(h.beta1, py, step)?;
        if py.lr && py.betas[0] && correction == 0.0 {
            return self.lr_over_zero(h.beta1, step);
        }
        self.convert(
            -h.lr / correction,
            Arg::Value,
            "lr",
            "-lr / (1 - beta1 ** step)",
        )
    }

    /// In torch's order: `beta2 ** step`, the weight decay, the momentum caches (`0.96 **
    /// (step * momentum_decay)`), the moments' weights, then each `addcdiv`'s value, a Python
    /// division by `1 - mu_product` (then by `1 - mu_product * mu_next`). `mu_product` is the
    /// value after this step's factor. `momentum_decay` is taken for a Python number.
    fn nadam(
        &self,
        h: &NAdamHyper,
        py: PyNumbers,
        step: f64,
        mu_product: f64,
    ) -> Result<(), CoreError> {
        let gi = self.gi;
        if py.betas[1] {
            if let PyPow::Overflow = python_pow(h.beta2, step) {
                return fail(
                    TorchRaises::Overflow,
                    format!(
                        "(34, 'Numerical result out of range'): param_groups[{gi}]['betas'][1] \
                         = {:?} raised to the step count {step} is out of a float's range",
                        h.beta2
                    ),
                );
            }
        }
        if !h.decoupled {
            self.weight_decay(h.weight_decay)?;
        }
        for s in [step, step + 1.0] {
            let exponent = s * h.momentum_decay;
            if exponent.is_finite() {
                if let PyPow::Overflow = python_pow(0.96, exponent) {
                    return fail(
                        TorchRaises::Overflow,
                        format!(
                            "(34, 'Numerical result out of range'): \
                             param_groups[{gi}]['momentum_decay'] = {:?} makes 0.96 ** ({s} * \
                             momentum_decay) out of a float's range",
                            h.momentum_decay
                        ),
                    );
                }
            }
        }
        self.convert(1.0 - h.beta1, Arg::Value, "betas", "1 - betas[0]")?;
        self.convert(1.0 - h.beta2, Arg::Value, "betas", "1 - betas[1]")?;
        let mu_next = h.mu(step + 1.0);
        let python = py.lr && py.betas[0];
        let values = [
            (h.mu(step), mu_product, "-lr * (1 - mu) / (1 - mu_product)"),
            (
                mu_next,
                mu_product * mu_next,
                "-lr * mu_next / (1 - mu_product * mu_next)",
            ),
        ];
        for (i, (mu, product, expr)) in values.into_iter().enumerate() {
            let numerator = if i == 0 {
                -h.lr * (1.0 - mu)
            } else {
                -h.lr * mu
            };
            if python && 1.0 - product == 0.0 {
                return fail(
                    TorchRaises::ZeroDivision,
                    format!(
                        "float division by zero: param_groups[{gi}]['betas'][0] = {:?} keeps \
                         the momentum product at 1 at step {step}, and torch.optim divides by \
                         1 - mu_product",
                        h.beta1
                    ),
                );
            }
            self.convert(numerator / (1.0 - product), Arg::Value, "lr", expr)?;
        }
        Ok(())
    }

    /// In torch's order: the weight decay, `add_(grad, alpha=-eta)` with the stored `eta`,
    /// then the new `eta`, `lr / ((1 + lambd * lr * step) ** alpha)` in Python floats (`lr`,
    /// `lambd` and `alpha` taken for Python numbers where `lr` is one).
    fn asgd(&self, h: &AsgdHyper, py: PyNumbers, step: f64, eta: f64) -> Result<(), CoreError> {
        let gi = self.gi;
        self.weight_decay(h.weight_decay)?;
        self.convert(-eta, Arg::Alpha, "lr", "-eta (state['eta'], from lr)")?;
        if !py.lr {
            return Ok(());
        }
        let base = h.eta_base(step);
        let what = format!(
            "param_groups[{gi}]['lambd'] = {:?}, param_groups[{gi}]['lr'] = {:?} and \
             param_groups[{gi}]['alpha'] = {:?} make (1 + lambd * lr * step) ** alpha = \
             {base:?} ** {:?} at step {step}",
            h.lambd, h.lr, h.alpha, h.alpha
        );
        if base == 0.0 && h.alpha < 0.0 {
            return fail(
                TorchRaises::ZeroDivision,
                format!("0.0 cannot be raised to a negative power: {what}"),
            );
        }
        let finite = base.is_finite() && h.alpha.is_finite();
        match h.eta_power(step) {
            EtaPower::Real(x) if finite && x.is_infinite() => fail(
                TorchRaises::Overflow,
                format!("(34, 'Numerical result out of range'): {what}"),
            ),
            EtaPower::Real(0.0) => fail(
                TorchRaises::ZeroDivision,
                format!("float division by zero: {what}, and torch.optim divides lr by it"),
            ),
            EtaPower::Complex(re, im) if !(re.is_finite() && im.is_finite()) => fail(
                TorchRaises::Overflow,
                format!("complex exponentiation: {what}"),
            ),
            EtaPower::Complex(re, im) if re == 0.0 && im == 0.0 => fail(
                TorchRaises::ZeroDivision,
                format!("complex division by zero: {what}, and torch.optim divides lr by it"),
            ),
            _ => Ok(()),
        }
    }

    /// `1 - beta1 ** step`, or what torch's step raises for it.
    fn bias_correction1(&self, beta1: f64, py: PyNumbers, step: f64) -> Result<f64, CoreError> {
        let power = if py.betas[0] {
            python_pow(beta1, step)
        } else {
            PyPow::Real(beta1.powf(step))
        };
        match power {
            PyPow::Real(x) => Ok(1.0 - x),
            // A fractional count (a loaded state) makes a complex step size, which the
            // tensor operation refuses, as for Adam.
            PyPow::Complex => Err(CoreError::torch(
                TorchRaises::Runtime,
                format!(
                    "value cannot be converted to type {} without overflow: \
                     param_groups[{}]['betas'][0] = {beta1:?} raised to the step count {step} \
                     is a complex number in Python",
                    if self.dtype == DType::F64 {
                        "double"
                    } else {
                        "float"
                    },
                    self.gi
                ),
            )),
            PyPow::Overflow => Err(CoreError::torch(
                TorchRaises::Overflow,
                format!(
                    "(34, 'Numerical result out of range'): param_groups[{}]['betas'][0] = \
                     {beta1:?} raised to the step count {step} is out of a float's range",
                    self.gi
                ),
            )),
        }
    }

    fn lr_over_zero(&self, beta1: f64, step: f64) -> Result<(), CoreError> {
        fail(
            TorchRaises::ZeroDivision,
            format!(
                "float division by zero: param_groups[{}]['betas'][0] = {beta1:?} makes the \
                 bias correction 1 - beta1 ** step zero at step {step}, and torch.optim \
                 divides lr by it",
                self.gi
            ),
        )
    }

    fn adagrad(&self, h: &AdagradHyper, py: PyNumbers, step: f64) -> Result<(), CoreError> {
        self.weight_decay(h.weight_decay)?;
        let decay = 1.0 + (step - 1.0) * h.lr_decay;
        if py.lr && py.lr_decay && decay == 0.0 {
            return fail(
                TorchRaises::ZeroDivision,
                format!(
                    "float division by zero: param_groups[{}]['lr_decay'] = {:?} makes \
                     1 + (step - 1) * lr_decay zero at step {step}, and torch.optim divides lr \
                     by it",
                    self.gi, h.lr_decay
                ),
            );
        }
        self.convert(
            -(h.lr / decay),
            Arg::Value,
            "lr",
            "-lr / (1 + (step - 1) * lr_decay)",
        )
    }
}

impl Scalars {
    fn adadelta(&self, h: &AdadeltaHyper) -> Result<(), CoreError> {
        self.weight_decay(h.weight_decay)?;
        self.convert(1.0 - h.rho, Arg::Value, "rho", "1 - rho")?;
        self.convert(-h.lr, Arg::Alpha, "lr", "-lr")
    }

    /// In torch's order: the weight decay, the moments' weights, `beta1 ** step`,
    /// `beta2 ** step`, then `2 / (1 - beta2)` and the division by `1 - beta2 ** step` in
    /// `rho_t`, Python float divisions.
    fn radam(&self, h: &RAdamHyper, py: PyNumbers, step: f64) -> Result<(), CoreError> {
        let gi = self.gi;
        if !h.decoupled {
            self.weight_decay(h.weight_decay)?;
        }
        self.convert(1.0 - h.beta1, Arg::Value, "betas", "1 - betas[0]")?;
        self.convert(1.0 - h.beta2, Arg::Value, "betas", "1 - betas[1]")?;
        let mut corrections = [0.0; 2];
        for (i, beta) in [h.beta1, h.beta2].into_iter().enumerate() {
            let power = if py.betas[i] {
                python_pow(beta, step)
            } else {
                PyPow::Real(beta.powf(step))
            };
            match power {
                PyPow::Real(x) => corrections[i] = 1.0 - x,
                // The step count is a whole number: a power is never complex here.
                PyPow::Complex => corrections[i] = f64::NAN,
                PyPow::Overflow => {
                    return fail(
                        TorchRaises::Overflow,
                        format!(
                            "(34, 'Numerical result out of range'): \
                             param_groups[{gi}]['betas'][{i}] = {beta:?} raised to the step \
                             count {step} is out of a float's range"
                        ),
                    );
                }
            }
        }
        if py.betas[1] && h.beta2 == 1.0 {
            return fail(
                TorchRaises::ZeroDivision,
                format!(
                    "float division by zero: param_groups[{gi}]['betas'][1] = 1.0 makes \
                     rho_inf = 2 / (1 - beta2) - 1 divide by zero"
                ),
            );
        }
        if py.betas[1] && corrections[1] == 0.0 {
            return fail(
                TorchRaises::ZeroDivision,
                format!(
                    "float division by zero: param_groups[{gi}]['betas'][1] = {:?} makes the \
                     bias correction 1 - beta2 ** step zero at step {step}, and torch.optim \
                     divides by it",
                    h.beta2
                ),
            );
        }
        // Rectified where rho_t > 5: `bias_correction2 ** 0.5` and `rect`, Python powers of
        // numbers that a beta2 out of [0, 1) can make negative: complex, which the update's
        // tensor operations then refuse.
        let rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
        let rho_t = rho_inf - 2.0 * step * h.beta2.powf(step) / corrections[1];
        let rect =
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t);
        if py.betas[1] && rho_t > 5.0 && (corrections[1] < 0.0 || rect < 0.0) {
            let (raises, torch_message) = match self.dtype {
                DType::F32 => (
                    TorchRaises::Runtime,
                    "result type ComplexFloat can't be cast to the desired output type Float",
                ),
                DType::F64 => (
                    TorchRaises::Runtime,
                    "result type ComplexDouble can't be cast to the desired output type Double",
                ),
                DType::F16 => (
                    TorchRaises::Runtime,
                    "result type ComplexHalf can't be cast to the desired output type Half",
                ),
                DType::Bf16 => (
                    TorchRaises::NotImplemented,
                    "\"mul_cpu\" not implemented for 'BComplex32'",
                ),
            };
            return fail(
                raises,
                format!(
                    "{torch_message}: param_groups[{gi}]['betas'][1] = {:?} makes the \
                     rectification's square roots complex at step {step} (rho_t = {rho_t:?}), \
                     which torch.optim takes in Python floats",
                    h.beta2
                ),
            );
        }
        Ok(())
    }

    /// The etas, assigned into a tensor of the parameter's dtype, then `clamp_`'s bounds.
    fn rprop(&self, h: &RpropHyper) -> Result<(), CoreError> {
        self.convert(h.etaplus, Arg::Alpha, "etas", "etas[1]")?;
        self.convert(h.etaminus, Arg::Alpha, "etas", "etas[0]")?;
        self.convert(h.step_size_min, Arg::Alpha, "step_sizes", "step_sizes[0]")?;
        self.convert(h.step_size_max, Arg::Alpha, "step_sizes", "step_sizes[1]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adam(beta1: f64, beta2: f64, lr: f64) -> Hyper {
        let h = AdamHyper {
            lr,
            beta1,
            beta2,
            ..AdamHyper::default()
        };
        let py = PyNumbers {
            lr: true,
            betas: [true, true],
            lr_decay: false,
        };
        Hyper::Adam(h, py)
    }

    fn raised(r: Result<(), CoreError>) -> Option<TorchRaises> {
        match r {
            Ok(()) => None,
            Err(CoreError {
                kind: crate::error::ErrorKind::Torch(t),
                ..
            }) => Some(t),
            Err(e) => panic!("not torch's exception: {e:?}"),
        }
    }

    #[test]
    fn python_pow_is_cpythons() {
        assert!(matches!(python_pow(-0.5, 3.0), PyPow::Real(x) if x == -0.125));
        assert!(matches!(python_pow(-0.5, 1.5), PyPow::Complex));
        assert!(matches!(python_pow(2.0, 1100.0), PyPow::Overflow));
        assert!(matches!(python_pow(f64::INFINITY, 3.0), PyPow::Real(x) if x.is_infinite()));
        assert!(matches!(python_pow(f64::NEG_INFINITY, 0.5), PyPow::Real(x) if x == f64::INFINITY));
        assert!(matches!(python_pow(f64::NAN, 2.0), PyPow::Real(x) if x.is_nan()));
    }

    #[test]
    fn adam_raises_where_torch_does() {
        let check_f32 = |h: &Hyper, step: f64| raised(check(h, 0, step, DType::F32, false));
        // Stepped with by torch: values its constructor refuses.
        for (b1, b2, lr) in [(0.9, 1.0, 1e-3), (2.0, 0.999, 1e-3), (0.9, 0.999, -1.0)] {
            assert_eq!(check_f32(&adam(b1, b2, lr), 3.0), None, "{b1} {b2} {lr}");
        }
        assert_eq!(
            check_f32(&adam(f64::NAN, f64::INFINITY, f64::NAN), 3.0),
            None
        );
        assert_eq!(
            check_f32(&adam(1.0, 0.999, 1e-3), 3.0),
            Some(TorchRaises::ZeroDivision)
        );
        // -1 ** step is 1 at even steps only.
        assert_eq!(check_f32(&adam(-1.0, 0.999, 1e-3), 3.0), None);
        assert_eq!(
            check_f32(&adam(-1.0, 0.999, 1e-3), 4.0),
            Some(TorchRaises::ZeroDivision)
        );
        assert_eq!(
            check_f32(&adam(0.9, 1.5, 1e-3), 1.0),
            Some(TorchRaises::Runtime)
        );
        assert_eq!(
            raised(check(&adam(0.9, 1.5, 1e-3), 0, 1.0, DType::Bf16, false)),
            Some(TorchRaises::NotImplemented)
        );
        assert_eq!(
            check_f32(&adam(2.0, 0.999, 1e-3), 1100.0),
            Some(TorchRaises::Overflow)
        );
        // A step size out of float32's range: refused for float32, not for float64.
        let huge = adam(0.9, 0.999, 1e300);
        assert_eq!(check_f32(&huge, 1.0), Some(TorchRaises::Runtime));
        assert_eq!(raised(check(&huge, 0, 1.0, DType::F64, false)), None);
        // Not Python numbers (tensors, NumPy scalars): IEEE arithmetic, as the kernels.
        let Hyper::Adam(h, _) = adam(1.0, 1.5, 1e-3) else {
            unreachable!()
        };
        let ieee = Hyper::Adam(h, PyNumbers::default());
        assert_eq!(check_f32(&ieee, 3.0), None);
    }

    #[test]
    fn radam_raises_where_torch_does() {
        let radam = |beta2: f64, py: bool| {
            Hyper::RAdam(
                RAdamHyper {
                    beta2,
                    ..RAdamHyper::default()
                },
                PyNumbers {
                    lr: py,
                    betas: [py, py],
                    lr_decay: false,
                },
            )
        };
        let at = |h: &Hyper, step: f64, dtype| raised(check(h, 0, step, dtype, false));
        assert_eq!(at(&radam(0.999, true), 10.0, DType::F32), None);
        assert_eq!(
            at(&radam(1.0, true), 1.0, DType::F32),
            Some(TorchRaises::ZeroDivision)
        );
        // beta2 = 2: rho_t = 5.53 at step 4, where 1 - 2 ** 4 < 0 has a complex square root
        assert_eq!(at(&radam(2.0, true), 3.0, DType::F32), None);
        assert_eq!(
            at(&radam(2.0, true), 4.0, DType::F64),
            Some(TorchRaises::Runtime)
        );
        assert_eq!(
            at(&radam(2.0, true), 4.0, DType::Bf16),
            Some(TorchRaises::NotImplemented)
        );
        // NumPy scalars: NaN, as the kernels compute
        assert_eq!(at(&radam(2.0, false), 4.0, DType::F32), None);
        assert_eq!(at(&radam(1.0, false), 1.0, DType::F32), None);
    }

    #[test]
    fn adagrad_divides_by_its_decay() {
        let h = AdagradHyper {
            lr_decay: -0.5,
            ..AdagradHyper::default()
        };
        let py = PyNumbers {
            lr: true,
            lr_decay: true,
            ..PyNumbers::default()
        };
        let at = |step| raised(check(&Hyper::Adagrad(h, py), 0, step, DType::F32, false));
        assert_eq!(at(3.0), Some(TorchRaises::ZeroDivision));
        assert_eq!(at(2.0), None);
        assert_eq!(at(4.0), None);
    }

    #[test]
    fn sgd_dampening_is_converted_once_a_buffer_exists() {
        let h = Hyper::Sgd(SgdHyper {
            momentum: 0.9,
            dampening: -1e300,
            ..SgdHyper::default()
        });
        assert_eq!(raised(check(&h, 0, 0.0, DType::F32, true)), None);
        assert_eq!(
            raised(check(&h, 0, 0.0, DType::F32, false)),
            Some(TorchRaises::Runtime)
        );
        // float16's `alpha` is a float16: -lr = -1e5 is out of its range, not of float32's.
        let lr = Hyper::Sgd(SgdHyper {
            lr: 1e5,
            ..SgdHyper::default()
        });
        assert_eq!(raised(check(&lr, 0, 0.0, DType::F32, false)), None);
        assert_eq!(
            raised(check(&lr, 0, 0.0, DType::F16, false)),
            Some(TorchRaises::Runtime)
        );
    }
}
