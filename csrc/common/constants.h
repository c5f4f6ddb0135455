// Numeric constants the kernels and their references share.
#pragma once

namespace xmodal {

// Norms are clamped here before dividing, so zero vectors normalise to zero (cosine 0 with everything), as
// F.normalize(eps=1e-12) does; the same floor guards the factorized pooling's normalisation.
constexpr double kNormEps = 1e-12;

}  // namespace xmodal
