#include "sampler.h"

#include <algorithm>
#include <cmath>

#include "error.h"

namespace kvq::runner {

Sampler::Sampler(float temperature, uint64_t seed) : temperature_(temperature), rng_(seed) {
  if (!(temperature >= 0.0f)) throw RunnerError("--temperature must be >= 0, got " + std::to_string(temperature));
}

int64_t Sampler::pick(const std::vector<float>& logits) {
  const auto max_it = std::max_element(logits.begin(), logits.end());
  if (temperature_ == 0.0f) return max_it - logits.begin();
  probs_.resize(logits.size());
  const double top = *max_it;
  for (size_t i = 0; i < logits.size(); ++i) probs_[i] = std::exp((logits[i] - top) / temperature_);
  std::discrete_distribution<int64_t> dist(probs_.begin(), probs_.end());  // normalizes
  return dist(rng_);
}

}  // namespace kvq::runner
