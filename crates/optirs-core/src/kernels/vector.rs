//! The one macro that makes the SIMD vector newtypes of [`super::x86`] and [`super::neon`]: a
//! `#[repr(transparent)]` wrapper of an intrinsic vector type with the operators and
//! [`super::lanes::Arith`], each operation the intrinsic (or the short expression of
//! intrinsics) the invoking module names for it, so a lane computes what the scalar code does
//! (each module's documentation says why its instructions give the scalar bits).

/// A vector newtype `$name` over the intrinsic type `$raw` with lanes of `$t`, and its
/// arithmetic: `add` to `sqrt`, and `splat`, name one intrinsic each; `neg`, `max`, `fma` (`self * a + b`,
/// one rounding), `select` (`m`'s lanes pick `t`, else `f`), `gt` and `eq` (the masks `select`
/// takes) are expressions over the raw vectors bound to the names given.
///
/// Safety of every intrinsic call in the impls: the invoking module's. Each invocation states
/// why the intrinsics it names may be called wherever its vectors are used (x86-64: only
/// inside element loops whose callers guarantee the CPU has the instruction set, see
/// `lanes::stream`; aarch64: NEON is baseline there).
macro_rules! vector {
    (
        $name:ident($raw:ty, $t:ty),
        add = $add:ident, sub = $sub:ident, mul = $mul:ident, div = $div:ident,
        sqrt = $sqrt:ident,
        fma = |$fs:ident, $fa:ident, $fb:ident| $fma:expr,
        splat = $splat:ident,
        neg = |$x:ident| $neg:expr,
        max = |$a:ident, $b:ident| $max:expr,
        select = |$m:ident, $st:ident, $sf:ident| $select:expr,
        gt = |$ga:ident, $gb:ident| $gt:expr,
        eq = |$ea:ident, $eb:ident| $eq:expr
    ) => {
        #[derive(Clone, Copy)]
        #[repr(transparent)]
        pub struct $name($raw);

        impl ::std::ops::Add for $name {
            type Output = Self;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                // SAFETY: see the macro's documentation.
                $name(unsafe { $add(self.0, o.0) })
            }
        }
        impl ::std::ops::Sub for $name {
            type Output = Self;
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                // SAFETY: as above.
                $name(unsafe { $sub(self.0, o.0) })
            }
        }
        impl ::std::ops::Mul for $name {
            type Output = Self;
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                // SAFETY: as above.
                $name(unsafe { $mul(self.0, o.0) })
            }
        }
        impl ::std::ops::Div for $name {
            type Output = Self;
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                // SAFETY: as above.
                $name(unsafe { $div(self.0, o.0) })
            }
        }
        impl ::std::ops::Neg for $name {
            type Output = Self;
            #[inline(always)]
            fn neg(self) -> Self {
                let $x = self.0;
                // SAFETY: as above.
                $name(unsafe { $neg })
            }
        }
        impl $crate::kernels::lanes::Arith<$t> for $name {
            #[inline(always)]
            fn splat(x: $t) -> Self {
                // SAFETY: as above.
                $name(unsafe { $splat(x) })
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                // SAFETY: as above.
                $name(unsafe { $sqrt(self.0) })
            }
            #[inline(always)]
            fn maximum(self, other: Self) -> Self {
                let ($a, $b) = (self.0, other.0);
                // SAFETY: as above.
                $name(unsafe { $max })
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                let ($fs, $fa, $fb) = (self.0, a.0, b.0);
                // SAFETY: as above.
                $name(unsafe { $fma })
            }
            #[inline(always)]
            fn select_gt(self, other: Self, then: Self, otherwise: Self) -> Self {
                let ($ga, $gb) = (self.0, other.0);
                let ($st, $sf) = (then.0, otherwise.0);
                // SAFETY: as above.
                $name(unsafe {
                    let $m = $gt;
                    $select
                })
            }
            #[inline(always)]
            fn select_eq(self, other: Self, then: Self, otherwise: Self) -> Self {
                let ($ea, $eb) = (self.0, other.0);
                let ($st, $sf) = (then.0, otherwise.0);
                // SAFETY: as above.
                $name(unsafe {
                    let $m = $eq;
                    $select
                })
            }
        }
    };
}

pub(crate) use vector;
