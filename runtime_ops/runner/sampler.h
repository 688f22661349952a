// Next-token choice: greedy (argmax, first on ties, as torch.argmax) or sampled from
// softmax(logits / temperature) with a seeded generator.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace kvq::runner {

class Sampler {
 public:
  explicit Sampler(float temperature = 0.0f, uint64_t seed = 0);
  int64_t pick(const std::vector<float>& logits);

 private:
  float temperature_;
  std::mt19937_64 rng_;
  std::vector<double> probs_;
};

}  // namespace kvq::runner
