// cofi::compact_encoder_fwd: the compact runtime's whole encoder (every layer of a pruned, ragged
// BERT/RoBERTa) in one call, for inference. Device-generic (CompositeExplicitAutograd): the GEMMs are
// at::addmm (on CPU split over output columns when there are few rows, csrc/cpu_linear.h) and the
// attention / FFN / LayerNorm steps are the cofi native ops, reached through the dispatcher, so the
// same code runs the CPU kernels and, in a CUDA build, the CUDA ones. It exists to take per-op Python
// overhead (~0.1 ms per custom-op call) out of small-batch latency; the math is the runtime's per-op
// path (python/cofi/runtime/modeling.py), equal to rounding. No autograd kernel: the runtime calls it
// only when no gradient is needed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../cpu_linear.h"
#include "../cpu_workspace.h"
#include "native_ops.h"
#include "../autocast_guard.h"

namespace cofi {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
using native::attention;
using native::ffn;
using native::layer_norm;

void check_vec(const Tensor& t, int64_t n, const char* what, int64_t layer) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "cofi::compact_encoder_fwd: layer ", layer, " ", what,
              " must have shape [", n, "], got ", t.sizes());
}

// Reads the flat parameter list in the order runtime/_fused.py flat_params writes it.
struct Cursor {
  const std::vector<Tensor>& p;
  size_t i = 0;
  const Tensor& next(const char* what, int64_t layer) {
    TORCH_CHECK(i < p.size(), "cofi::compact_encoder_fwd: params ran out at layer ", layer, " (", what,
                "); got ", p.size(), " tensors");
    return p[i++];
  }
  const Tensor& vec(const char* what, int64_t layer, int64_t n) {
    const Tensor& t = next(what, layer);
    check_vec(t, n, what, layer);
    return t;
  }
};

void check_mat(const Tensor& t, int64_t r, int64_t c, const char* what, int64_t layer) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == r && t.size(1) == c, "cofi::compact_encoder_fwd: layer ", layer, " ",
              what, " must have shape [", r, ", ", c, "], got ", t.sizes());
}

}  // namespace

// x: [B, S, d] (embedding output); key_padding_mask: [B, S] bool (true = token) or None.
// params, per layer i: if present[i] & 1 (attention): [qkv_w [3w, d], qkv_b [3w], out_w [d, w]] when
// num_heads[i] > 0, then out_b [d], ln_w [d], ln_b [d]; if present[i] & 2 (FFN): [w1 [F, d], b1 [F],
// w2 [d, F]] when widths[i] > 0, then b2 [d], ln_w [d], ln_b [d]. (w = num_heads[i] * head_dim.)
// Returns every layer's output [B, S, d] when all_hidden_states, else the last layer's output alone;
// never a view of x (a layer with no sublayers left returns a copy).
// unpad (with a key_padding_mask that has padding): every row-wise step (projections, FFN, LayerNorm)
// runs on the real tokens only, packed; attention scatters them back into the padded layout its
// kernel reads. Outputs are 0 at padding positions (otherwise they are computed from the pads).
// cls_only (not with all_hidden_states): the output is the position-0 row alone, [B, 1, d]. After the
// attention of the last layer that has heads, every step is row-wise, so from there on only the
// position-0 rows are computed (in CoFi's structures the upper layers are mostly attention-free).
std::vector<Tensor> compact_encoder_fwd(const Tensor& x_in, const OptT& key_padding_mask,
                                        const std::vector<Tensor>& params, at::IntArrayRef num_heads,
                                        at::IntArrayRef widths, at::IntArrayRef present, int64_t head_dim,
                                        int64_t activation, double eps, const OptT& hidden_z,
                                        bool all_hidden_states, bool unpad, bool cls_only) {
  const NoAutocast no_autocast;
  const char* fn = "cofi::compact_encoder_fwd";
  TORCH_CHECK(x_in.dim() == 3, fn, ": x must be [B, S, d], got ", x_in.sizes());
  const int64_t L = static_cast<int64_t>(present.size());
  TORCH_CHECK(static_cast<int64_t>(num_heads.size()) == L && static_cast<int64_t>(widths.size()) == L, fn,
              ": num_heads, widths and present must have one entry per layer, got ", num_heads.size(), ", ",
              widths.size(), ", ", present.size());
  TORCH_CHECK(head_dim > 0, fn, ": head_dim must be > 0, got ", head_dim);
  const int64_t Bsz = x_in.size(0), S = x_in.size(1), d = x_in.size(2), N = Bsz * S;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const cpu::WorkspaceScope workspace(x_in.is_cpu());  // intermediates reuse earlier calls' memory
  Tensor x = x_in.reshape({N, d}).contiguous();
  Tensor idx;  // [R] rows of the real tokens when unpadding, else undefined
  if (unpad && key_padding_mask) {
    TORCH_CHECK(key_padding_mask->numel() == N, fn, ": key_padding_mask must be [B, S] = [", Bsz, ", ", S,
                "], got ", key_padding_mask->sizes());
    Tensor rows = key_padding_mask->reshape({N}).nonzero().squeeze(1);
    if (rows.size(0) > 0 && rows.size(0) < N) {
      idx = rows;
      x = x.index_select(0, idx);
    }
  }
  auto padded = [&](const Tensor& packed) {  // [R, c] -> [N, c], zeros at padding rows
    if (!idx.defined()) return packed;
    return at::zeros({N, packed.size(1)}, packed.options()).index_copy_(0, idx, packed);
  };
  auto cls_rows = [&](const Tensor& t) {  // [R or N, c] -> [B, c], the position-0 rows
    return padded(t).view({Bsz, S, t.size(1)}).select(1, 0).clone(at::MemoryFormat::Contiguous);
  };
  TORCH_CHECK(!(cls_only && all_hidden_states), fn, ": cls_only returns the position-0 rows alone; it cannot "
              "be combined with all_hidden_states");
  int64_t last_attention = -1;  // from after its attention on, only the position-0 rows are computed
  for (int64_t i = 0; cls_only && i < L; ++i)
    if ((present[i] & 1) && num_heads[i] > 0) last_attention = i;
  bool cls = false;
  if (cls_only && last_attention < 0) {
    x = cls_rows(x);
    cls = true;
  }
  bool fresh = cls;  // x was written by this layer (outputs must not alias x_in or each other)
  auto emit = [&]() {
    if (cls) {
      // with unpadding, a padded position 0 must give 0 like every other padded position
      if (idx.defined()) x = x * key_padding_mask->select(1, 0).unsqueeze(1).to(x.scalar_type());
      return x.view({Bsz, 1, d});
    }
    if (idx.defined()) return padded(x).view({Bsz, S, d});
    if (!fresh) x = x.clone();
    return x.view({Bsz, S, d});
  };
  std::vector<Tensor> out;
  Cursor c{params};
  auto add_norm = [&](const Tensor& branch, int64_t i) {  // x = LayerNorm(branch + x), the sublayer's own LN
    const Tensor& lw = c.vec("ln_weight", i, d);
    const Tensor& lb = c.vec("ln_bias", i, d);
    x = layer_norm(branch, x, lw, lb, hidden_z, eps);
    fresh = true;
  };
  bool any = false;
  for (int64_t i = 0; i < L; ++i) {
    fresh = false;
    if (present[i] & 1) {
      const int64_t h = num_heads[i], w = h * head_dim;
      Tensor a;
      if (h > 0) {
        const Tensor& qkv_w = c.next("qkv_weight", i);
        check_mat(qkv_w, 3 * w, d, "qkv_weight", i);
        const Tensor& qkv_b = c.vec("qkv_bias", i, 3 * w);
        const Tensor& out_w = c.next("out_weight", i);
        check_mat(out_w, d, w, "out_weight", i);
        Tensor qkv = padded(cpu::linear(x, qkv_w, qkv_b)).view({Bsz, S, 3, h, head_dim});
        Tensor ctx = std::get<0>(attention(qkv.select(2, 0).transpose(1, 2), qkv.select(2, 1).transpose(1, 2),
                                           qkv.select(2, 2).transpose(1, 2), key_padding_mask, scale));
        const Tensor& out_b = c.vec("out_bias", i, d);
        if (i == last_attention) {
          x = cls_rows(x);
          cls = true;
          a = cpu::linear(ctx.select(2, 0).reshape({Bsz, w}), out_w, out_b);
        } else {
          Tensor rows = ctx.transpose(1, 2).reshape({N, w});
          a = cpu::linear(idx.defined() ? rows.index_select(0, idx) : rows, out_w, out_b);
        }
      } else {
        a = c.vec("out_bias", i, d).expand({x.size(0), d}).contiguous();
      }
      add_norm(a, i);
    }
    if (present[i] & 2) {
      const int64_t f = widths[i];
      Tensor y;
      if (f > 0) {
        const Tensor& w1 = c.next("w1", i);
        check_mat(w1, f, d, "w1", i);
        const Tensor& b1 = c.vec("b1", i, f);
        const Tensor& w2 = c.next("w2", i);
        check_mat(w2, d, f, "w2", i);
        y = ffn(x, w1, b1, w2, c.vec("b2", i, d), activation);
      } else {
        y = c.vec("b2", i, d).expand({x.size(0), d}).contiguous();
      }
      add_norm(y, i);
    }
    any = any || fresh;
    if (all_hidden_states) out.push_back(emit());
  }
  TORCH_CHECK(c.i == params.size(), fn, ": got ", params.size(), " params, the structure uses ", c.i);
  if (!all_hidden_states) {
    fresh = any;
    out.push_back(emit());
  }
  return out;
}

std::vector<int64_t> cpu_workspace_stats() {
  const auto s = cpu::Workspace::get().stats();
  return {s.begin(), s.end()};
}

int64_t cpu_workspace_release() { return cpu::Workspace::get().release(); }

// Python's cofi.runtime.workspace.scope(): turns the calling thread's workspace on (when enabled and
// installable); returns the previous state, which cpu_workspace_exit restores.
bool cpu_workspace_enter() { return cpu::Workspace::enter(); }

void cpu_workspace_exit(bool previous) { cpu::Workspace::exit(previous); }

TORCH_LIBRARY_IMPL(cofi, CompositeExplicitAutograd, m) {
  m.impl("compact_encoder_fwd", &compact_encoder_fwd);
}

TORCH_LIBRARY_IMPL(cofi, CompositeImplicitAutograd, m) {
  m.impl("cpu_workspace_stats", &cpu_workspace_stats);
  m.impl("cpu_workspace_release", &cpu_workspace_release);
  m.impl("cpu_workspace_enter", &cpu_workspace_enter);
  m.impl("cpu_workspace_exit", &cpu_workspace_exit);
}

}  // namespace cofi
