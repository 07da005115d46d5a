// The extension cofi._C: one block that declares every native op schema of namespace cofi.
// Kernels are registered per dispatch key next to their sources (csrc/<op>/<op>_cpu.cpp, *_cuda.cpp;
// device-generic compositions over those ops in *_composite.cpp).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing cofi._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cofi, m) {
  // --- hard_concrete ---
  m.def("hard_concrete_sample_fwd_native(Tensor log_alpha, Tensor u, float temperature, float limit_l, float limit_r) -> Tensor");
  m.def("hard_concrete_sample_bwd_native(Tensor grad, Tensor log_alpha, Tensor u, float temperature, float limit_l, float limit_r) -> Tensor");
  m.def("hard_concrete_keep_prob_fwd_native(Tensor log_alpha, float temperature, float limit_l, float limit_r, float eps) -> Tensor");
  m.def("hard_concrete_keep_prob_bwd_native(Tensor grad, Tensor log_alpha, float temperature, float limit_l, float limit_r, float eps) -> Tensor");
  m.def("hard_concrete_deterministic_native(Tensor log_alpha, bool binary, float temperature, float limit_l, float limit_r, float eps) -> Tensor");
  m.def("expected_size_fwd_native(Tensor? hidden, Tensor? head, Tensor? mha, Tensor? intermediate, Tensor? ffn, int num_layers, int hidden_size, int num_heads, int intermediate_size) -> (Tensor, Tensor)");
  m.def("expected_size_bwd_native(Tensor grad_params, Tensor grad_sparsity, Tensor? hidden, Tensor? head, Tensor? mha, Tensor? intermediate, Tensor? ffn, int num_layers, int hidden_size, int num_heads, int intermediate_size) -> Tensor[]");
  m.def("hard_concrete_step_fwd_native(Tensor log_alpha, Tensor u, int[] offsets, int num_layers, int hidden_size, int num_heads, int intermediate_size, float temperature, float limit_l, float limit_r, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("hard_concrete_step_bwd_native(Tensor? grad_z, Tensor? grad_keep, Tensor grad_params, Tensor grad_sparsity, Tensor log_alpha, Tensor u, Tensor z, Tensor keep, int[] offsets, int num_layers, int hidden_size, int num_heads, int intermediate_size, float temperature, float limit_l, float limit_r, float eps) -> Tensor");
  // --- masked_attention ---
  m.def("masked_attention_fwd_native(Tensor q, Tensor k, Tensor v, Tensor? head_z, Tensor? key_padding_mask, float scale, float dropout_p, Tensor? seed, bool causal=False) -> (Tensor, Tensor)");
  m.def("masked_attention_bwd_native(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? head_z, Tensor? key_padding_mask, Tensor out, Tensor lse, float scale, float dropout_p, Tensor? seed, bool causal=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // --- end masked_attention ---
  // --- masked_ffn ---
  m.def("masked_ffn_fwd_native(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? int_z, Tensor? mlp_z, Tensor? live, int activation) -> (Tensor, Tensor)");
  m.def("masked_ffn_bwd_native(Tensor grad, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? int_z, Tensor? mlp_z, Tensor? live, Tensor h, int activation, bool[] needs) -> Tensor[]");
  m.def("masked_ffn_gated_fwd_native(Tensor x, Tensor wg, Tensor bg, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? int_z, Tensor? mlp_z, Tensor? live, int activation) -> (Tensor, Tensor)");
  m.def("masked_ffn_gated_bwd_native(Tensor grad, Tensor x, Tensor wg, Tensor bg, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? int_z, Tensor? mlp_z, Tensor? live, Tensor h, int activation, bool[] needs) -> Tensor[]");
  // --- end masked_ffn ---
  // --- masked_layer_norm ---
  m.def("masked_layer_norm_fwd_native(Tensor x, Tensor? residual, Tensor weight, Tensor bias, Tensor? hidden_z, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("masked_layer_norm_bwd_native(Tensor grad, Tensor x, Tensor? residual, Tensor weight, Tensor bias, Tensor? hidden_z, Tensor mean, Tensor rstd, float eps, bool[] needs) -> Tensor[]");
  // --- end masked_layer_norm ---
  // --- masked_rms_norm ---
  m.def("masked_rms_norm_fwd_native(Tensor x, Tensor? residual, Tensor weight, Tensor? hidden_z, float eps, bool want_sum) -> (Tensor, Tensor, Tensor)");
  m.def("masked_rms_norm_bwd_native(Tensor grad, Tensor? grad_sum, Tensor x, Tensor? residual, Tensor weight, Tensor? hidden_z, Tensor rstd, bool[] needs) -> Tensor[]");
  // --- end masked_rms_norm ---
  // --- compact_encoder (runtime; composite over the ops above) ---
  m.def("compact_encoder_fwd(Tensor x, Tensor? key_padding_mask, Tensor[] params, int[] num_heads, int[] widths, int[] present, int head_dim, int activation, float eps, Tensor? hidden_z, bool all_hidden_states, bool unpad, bool cls_only) -> Tensor[]");
  m.def("compact_embeddings_fwd(Tensor input_ids, Tensor? token_type_ids, Tensor? position_ids, Tensor word, Tensor position, Tensor token_type, Tensor ln_weight, Tensor ln_bias, Tensor? hidden_z, float eps) -> Tensor");
  // --- decode_linear (runtime; few-row projections at streaming speed, CPU) ---
  m.def("decode_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("llama_decode_step(Tensor r, Tensor?[] params, int[] dims, Tensor cos, Tensor sin, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, int start, Tensor? mask, int head_dim, float eps, Tensor? norm=None, Tensor? lm_head=None) -> Tensor");
  // their CPU workspace (csrc/cpu_workspace.h): {cached bytes, bytes in use, hits, misses}; free the cache
  m.def("cpu_workspace_stats() -> int[]");
  m.def("cpu_workspace_release() -> int");
  m.def("cpu_workspace_enter() -> bool");
  m.def("cpu_workspace_exit(bool previous) -> ()");
}
