// Host-side check of csrc/cuda/token_keys.cuh, the ordering and index logic select_tokens and
// gather_tokens_backward run on the GPU. Runs on the CPU (no GPU needed): the header's functions are
// __host__ __device__.
//
//   nvcc -std=c++20 -x cu tools/check_token_keys.cu -o /tmp/ctk && /tmp/ctk
//
// Checked on random spans (with NaN, +-inf, +-0.0, denormals and many exact ties mixed in):
//   - sorting the 64-bit keys descending gives "score descending, NaN last, -0.0 == +0.0, ties to the lower
//     position", compared with a std::stable_sort by that rule written out directly;
//   - the signed form used for at::topk sorts the same way;
//   - the bitonic network as the kernel runs it (padded with 0 keys to a power of two) sorts like std::sort, and
//     the top `keep` positions it yields, compacted in ascending order, match the direct rule;
//   - the counting-sort inverse built 32 lanes at a time with the header's fill step gives, for every destination,
//     exactly the ascending list of sources pointing at it (index -1 ignored), for K not a multiple of 32, K = 0,
//     L = 0, all indices equal, and all -1.
// Exits 1 on the first mismatch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "../csrc/cuda/token_keys.cuh"

namespace tk = epic_ext::token_keys;

namespace {

int failures = 0;

void fail(const char* what, int trial) {
  std::printf("MISMATCH: %s (trial %d)\n", what, trial);
  ++failures;
}

// The rule select_tokens documents, written out without keys: true when (a at pa) ranks before (b at pb).
bool ranks_before(float a, uint32_t pa, float b, uint32_t pb) {
  const bool na = std::isnan(a);
  const bool nb = std::isnan(b);
  if (na != nb) return nb;          // the number ranks before the NaN
  if (!na && a != b) return a > b;  // -0.0 == +0.0 here, as in IEEE comparison
  return pa < pb;                   // equal scores, or both NaN
}

std::vector<float> random_scores(std::mt19937_64& rng, int n) {
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            0.0f,
                            -0.0f,
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(),
                            1.0f,
                            -1.0f};
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<int> special(0, static_cast<int>(sizeof(specials) / sizeof(specials[0])) - 1);
  std::uniform_int_distribution<int> small(-3, 3);
  std::normal_distribution<float> normal(0.0f, 10.0f);
  std::vector<float> s(n);
  for (float& v : s) {
    const int k = kind(rng);
    if (k < 2) {
      v = specials[special(rng)];
    } else if (k < 5) {
      v = static_cast<float>(small(rng)) * 0.5f;  // many exact ties
    } else {
      v = normal(rng);
    }
  }
  return s;
}

std::vector<uint32_t> reference_order(const std::vector<float>& s) {
  std::vector<uint32_t> order(s.size());
  for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t a, uint32_t b) { return ranks_before(s[a], a, s[b], b); });
  return order;
}

void bitonic_sort_descending(std::vector<uint64_t>& keys) {
  const uint32_t n = static_cast<uint32_t>(keys.size());
  for (uint32_t k = 2; k <= n; k <<= 1) {
    for (uint32_t j = k >> 1; j > 0; j >>= 1) {
      for (uint32_t pair = 0; pair < n / 2; ++pair) {
        const uint32_t i = tk::bitonic_lower_index(pair, j);
        const uint32_t ixj = i | j;
        if ((i & j) != 0u || ixj >= n) {
          std::printf("bad bitonic pair index %u (j %u, n %u)\n", i, j, n);
          std::exit(1);
        }
        if (tk::bitonic_must_swap(keys[i], keys[ixj], tk::bitonic_descending(i, k))) std::swap(keys[i], keys[ixj]);
      }
    }
  }
}

void check_keys(std::mt19937_64& rng, int trial) {
  std::uniform_int_distribution<int> len(1, 700);
  const int n = trial < 4 ? trial + 1 : len(rng);
  const std::vector<float> s = random_scores(rng, n);
  const std::vector<uint32_t> want = reference_order(s);

  std::vector<uint64_t> keys(n);
  for (int i = 0; i < n; ++i) keys[i] = tk::token_key(s[i], static_cast<uint32_t>(i));
  for (int i = 0; i < n; ++i) {
    if (keys[i] == 0u) fail("a real key equals the padding key 0", trial);
    if (tk::token_key_position(keys[i]) != static_cast<uint32_t>(i)) fail("position does not round-trip", trial);
    if (tk::token_key_from_signed(tk::token_key_to_signed(keys[i])) != keys[i]) fail("signed round-trip", trial);
  }

  // Unsigned descending sort of the keys.
  std::vector<uint64_t> sorted = keys;
  std::sort(sorted.begin(), sorted.end(), [](uint64_t a, uint64_t b) { return a > b; });
  for (int i = 0; i < n; ++i) {
    if (tk::token_key_position(sorted[i]) != want[i]) {
      fail("key order differs from the ranking rule", trial);
      break;
    }
  }
  // Signed form (at::topk on int64).
  std::vector<int64_t> signed_keys(n);
  for (int i = 0; i < n; ++i) signed_keys[i] = tk::token_key_to_signed(keys[i]);
  std::sort(signed_keys.begin(), signed_keys.end(), [](int64_t a, int64_t b) { return a > b; });
  for (int i = 0; i < n; ++i) {
    if (tk::token_key_position(tk::token_key_from_signed(signed_keys[i])) != want[i]) {
      fail("signed key order differs from the ranking rule", trial);
      break;
    }
  }
  // Bitonic network, padded with 0 keys to a power of two (at least 64, as the kernel does).
  uint32_t padded = 64;
  while (padded < static_cast<uint32_t>(n)) padded <<= 1;
  std::vector<uint64_t> net(padded, 0u);
  std::copy(keys.begin(), keys.end(), net.begin());
  bitonic_sort_descending(net);
  for (int i = 0; i < n; ++i) {
    if (net[i] != sorted[i]) {
      fail("bitonic network order differs from std::sort", trial);
      break;
    }
  }
  for (uint32_t i = n; i < padded; ++i) {
    if (net[i] != 0u) {
      fail("padding key not sorted last", trial);
      break;
    }
  }
  // Top keep, then ascending positions through a flag array (the kernel's compaction).
  std::uniform_int_distribution<int> keep_dist(0, n);
  const int keep = keep_dist(rng);
  std::vector<uint8_t> flags(n, 0);
  for (int i = 0; i < keep; ++i) {
    const uint32_t pos = tk::token_key_position(net[i]);
    if (pos >= static_cast<uint32_t>(n)) {
      fail("a padding key reached the top keep", trial);
      return;
    }
    flags[pos] = 1;
  }
  std::vector<uint32_t> got;
  for (int i = 0; i < n; ++i)
    if (flags[i]) got.push_back(static_cast<uint32_t>(i));
  std::vector<uint32_t> expect(want.begin(), want.begin() + keep);
  std::sort(expect.begin(), expect.end());
  if (got != expect) fail("selected positions differ", trial);
}

// Explicit cases named in the contract.
void check_special_order() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    float a;
    uint32_t pa;
    float b;
    uint32_t pb;
    bool a_first;
    const char* what;
  };
  const Case cases[] = {
      {-inf, 5, nan, 0, true, "-inf before NaN"},
      {nan, 0, nan, 1, true, "NaN: lower position first"},
      {nan, 2, nan, 1, false, "NaN: higher position second"},
      {-0.0f, 0, 0.0f, 1, true, "-0.0 == +0.0: lower position first"},
      {0.0f, 0, -0.0f, 1, true, "+0.0 == -0.0: lower position first"},
      {-0.0f, 3, 0.0f, 1, false, "-0.0 == +0.0: higher position second"},
      {inf, 9, 1e38f, 0, true, "+inf before max"},
      {-1e-45f, 0, 0.0f, 1, false, "negative denormal below zero"},
      {1e-45f, 1, 0.0f, 0, true, "positive denormal above zero"},
      {2.0f, 7, 2.0f, 3, false, "tie: higher position second"},
  };
  for (const Case& c : cases) {
    const bool got = tk::token_key(c.a, c.pa) > tk::token_key(c.b, c.pb);
    if (got != c.a_first || ranks_before(c.a, c.pa, c.b, c.pb) != c.a_first) fail(c.what, -1);
  }
}

// ---- inverse lists ---------------------------------------------------------------------------------------------

// The kernel's algorithm, one sample, with the header's fill step; returns the cursors (bucket ends) and sources.
void build_inverse(const std::vector<int64_t>& index, int length, std::vector<int>& ends, std::vector<int>& sources) {
  const int K = static_cast<int>(index.size());
  std::vector<int> offs(length, 0);
  for (int k = 0; k < K; ++k)
    if (index[k] >= 0) ++offs[index[k]];
  int running = 0;
  for (int p = 0; p < length; ++p) {
    const int c = offs[p];
    offs[p] = running;
    running += c;
  }
  sources.assign(K, -1);
  for (int base = 0; base < K; base += 32) {
    int64_t v[32];
    for (int lane = 0; lane < 32; ++lane) v[lane] = base + lane < K ? index[base + lane] : -1;
    // Every lane reads its cursor before any leader advances one (the __syncwarp between them on the GPU).
    int slot[32];
    uint32_t peers[32];
    for (int lane = 0; lane < 32; ++lane) {
      peers[lane] = 0;
      for (int other = 0; other < 32; ++other)
        if (v[other] == v[lane]) peers[lane] |= 1u << other;  // __match_any_sync
      slot[lane] = v[lane] >= 0 ? tk::inverse_fill_slot(offs[v[lane]], peers[lane], lane) : -1;
    }
    for (int lane = 0; lane < 32; ++lane)
      if (v[lane] >= 0) sources[slot[lane]] = base + lane;
    for (int lane = 0; lane < 32; ++lane)
      if (v[lane] >= 0 && tk::inverse_group_leader(peers[lane], lane))
        offs[v[lane]] = tk::inverse_advance_cursor(offs[v[lane]], peers[lane]);
  }
  ends = offs;
}

void check_inverse(std::mt19937_64& rng, int trial) {
  int K, length;
  std::vector<int64_t> index;
  switch (trial) {
    case 0: K = 0; length = 5; break;
    case 1: K = 7; length = 0; break;      // all -1
    case 2: K = 100; length = 1; break;    // all equal (or -1)
    case 3: K = 64; length = 3; break;
    default: {
      std::uniform_int_distribution<int> kd(1, 300);
      std::uniform_int_distribution<int> ld(1, 400);
      K = kd(rng);
      length = ld(rng);
    }
  }
  std::uniform_int_distribution<int> pick(-1, std::max(length - 1, -1));
  std::uniform_int_distribution<int> hot(0, 3);
  index.resize(K);
  const int64_t hot_value = length > 0 ? pick(rng) : -1;
  for (int64_t& v : index) {
    if (length == 0) {
      v = -1;
    } else if (trial == 2) {
      v = hot(rng) == 0 ? -1 : 0;
    } else {
      v = hot(rng) == 0 ? hot_value : pick(rng);  // repeats on purpose
    }
  }
  std::vector<int> ends, sources;
  build_inverse(index, length, ends, sources);
  int listed = 0;
  for (int p = 0; p < length; ++p) {
    std::vector<int> want;
    for (int k = 0; k < K; ++k)
      if (index[k] == p) want.push_back(k);
    const int begin = tk::inverse_bucket_begin(ends.data(), p);
    const int end = tk::inverse_bucket_end(ends.data(), p);
    if (begin < 0 || end < begin || end > K) {
      fail("bucket bounds out of range", trial);
      return;
    }
    const std::vector<int> got(sources.begin() + begin, sources.begin() + end);
    if (got != want) {
      fail("inverse list differs from the naive one", trial);
      return;
    }
    listed += end - begin;
  }
  int valid = 0;
  for (int64_t v : index) valid += v >= 0;
  if (listed != valid) fail("inverse lists do not cover every valid source exactly once", trial);
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261122);
  check_special_order();
  constexpr int kKeyTrials = 400;
  constexpr int kInverseTrials = 400;
  for (int t = 0; t < kKeyTrials; ++t) check_keys(rng, t);
  for (int t = 0; t < kInverseTrials; ++t) check_inverse(rng, t);
  if (failures != 0) {
    std::printf("check_token_keys: %d mismatches\n", failures);
    return 1;
  }
  std::printf("check_token_keys: ok (%d key trials, %d inverse-list trials, special cases)\n", kKeyTrials,
              kInverseTrials);
  return 0;
}
