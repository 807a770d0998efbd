// ONNX Runtime registration of rewrite::LoraDelta (domain "rewrite", version 1) with the lite custom-op API.
//
// Built against the ORT 1.21 headers (ORT_API_VERSION 21); newer runtimes keep serving that API version, so the
// library loads into any onnxruntime >= 1.21 (ONNX.md §7.1). Not linked against libonnxruntime: the API table
// comes from the host at RegisterCustomOps. Only RegisterCustomOps is exported (exports.map).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

#include <optional>
#include <type_traits>
#include <vector>

#include "lora_delta.h"

namespace rewrite_lora {
namespace {

using Ort::Custom::Tensor;

// Errors are returned as statuses, never thrown across the C boundary into ONNX Runtime.
Ort::Status fail(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return Ort::Status(msg.c_str(), code);
}

// Shapes, index range and output allocation shared by both execution providers and both bank types (TB = float or
// Ort::Float16_t). Returns "" or the message.
template <typename TB>
std::string prepare(const Tensor<float>& x, const Tensor<TB>& a, const Tensor<TB>& b,
                    const Tensor<int64_t>& idx, const Tensor<float>* base, Tensor<float>& y, Problem& p) {
  const auto& xs = x.Shape();
  const auto& as = a.Shape();
  const auto& bs = b.Shape();
  const auto& is = idx.Shape();
  std::string err = check_shapes(xs.data(), xs.size(), as.data(), as.size(), bs.data(), bs.size(), is.data(),
                                 is.size(), p);
  if (!err.empty()) return err;
  p.idx = idx.Data();  // host memory (CPU EP; for the CUDA EP input 3 is declared OrtMemTypeCPUInput)
  err = check_indices(p.idx, p.nb, p.k);
  if (!err.empty()) return err;
  std::vector<int64_t> ys = xs;
  ys.back() = p.dout;
  if (base != nullptr) {
    if (base->Shape() != ys) return "LoraDelta: base must have the shape of x with the last dim d_out";
    p.base = base->Data();
  }
  p.y = y.Allocate(ys);  // base's own buffer when ORT runs the op in place (kernel_may_inplace below)
  p.x = x.Data();
  p.a = a.Data();
  p.b = b.Data();
  p.half_banks = std::is_same<TB, Ort::Float16_t>::value;
  return "";
}

void ort_parallel_for(void* c, void (*fn)(void*, size_t), size_t total, size_t max_batches, void* data) {
  static_cast<const Ort::KernelContext*>(c)->ParallelFor(fn, total, max_batches, data);
}

using OptionalBase = std::optional<const Tensor<float>*>;

const Tensor<float>* present(const OptionalBase& base) { return base.has_value() ? *base : nullptr; }

// The kernel shared by both execution providers: check and allocate (prepare), skip an empty problem, then
// compute(p, kctx) -> Ort::Status; exceptions become statuses.
template <typename TB, typename Compute>
Ort::Status run_kernel(OrtKernelContext* context, const Tensor<float>& x, const Tensor<TB>& a, const Tensor<TB>& b,
                       const Tensor<int64_t>& idx, const OptionalBase& base, Tensor<float>& y, Compute compute) {
  try {
    Problem p;
    const std::string err = prepare(x, a, b, idx, present(base), y, p);
    if (!err.empty()) return fail(err);
    if (p.n == 0 || p.dout == 0) return Ort::Status{nullptr};
    const Ort::KernelContext kctx(context);
    return compute(p, kctx);
  } catch (const Ort::Exception& e) {
    return fail(e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return fail(std::string("LoraDelta: ") + e.what(), ORT_FAIL);
  }
}

template <typename TB>
Ort::Status LoraDeltaCpu(OrtKernelContext* context, const Tensor<float>& x, const Tensor<TB>& a, const Tensor<TB>& b,
                         const Tensor<int64_t>& idx, OptionalBase base, Tensor<float>& y) {
  return run_kernel(context, x, a, b, idx, base, y, [](const Problem& p, const Ort::KernelContext& kctx) {
    Executor ex;
    ex.run = ort_parallel_for;
    ex.ctx = const_cast<Ort::KernelContext*>(&kctx);
    ex.threads = env_threads();
    lora_delta_cpu(p, ex);
    return Ort::Status{nullptr};
  });
}

#ifdef REWRITE_LORA_CUDA
template <typename TB>
Ort::Status LoraDeltaCuda(OrtKernelContext* context, const Tensor<float>& x, const Tensor<TB>& a, const Tensor<TB>& b,
                          const Tensor<int64_t>& idx, OptionalBase base, Tensor<float>& y) {
  return run_kernel(context, x, a, b, idx, base, y, [](const Problem& p, const Ort::KernelContext& kctx) {
    const std::string err = lora_delta_cuda(p, kctx.GetGPUComputeStream());
    return err.empty() ? Ort::Status{nullptr} : fail(err, ORT_RUNTIME_EXCEPTION);
  });
}
#endif

Ort::Status infer_shape(Ort::ShapeInferContext& ctx) {
  // y = x.shape[:-1] + [B_bank.shape[2]]
  try {
    Ort::ShapeInferContext::Shape s = ctx.GetInputShape(0);
    const auto& bs = ctx.GetInputShape(2);
    if (s.empty() || bs.size() != 3) return Ort::Status{nullptr};
    s.back() = bs[2];
    return ctx.SetOutputShape(0, s);
  } catch (const Ort::Exception& e) {
    return fail(e.what(), e.GetOrtErrorCode());
  }
}

// y may reuse base's buffer (input 4 -> output 0): ORT decides, when base has no other consumer.
size_t ORT_API_CALL kernel_may_inplace(int** input_index, int** output_index) {
  *input_index = new int[1]{4};
  *output_index = new int[1]{0};
  return 1;
}
void ORT_API_CALL release_may_inplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

Ort::Custom::OrtLiteCustomOp* in_place(Ort::Custom::OrtLiteCustomOp* op) {  // (y may reuse input 4, base)
  op->GetMayInplace = kernel_may_inplace;
  op->ReleaseMayInplace = release_may_inplace;
  return op;
}

struct Registry {
  Ort::CustomOpDomain domain{"rewrite"};
  std::vector<Ort::Custom::OrtLiteCustomOp*> ops;  // never freed (see registry())
};

Registry& registry() {
  // Domain and ops must outlive every session that uses them: static storage, never freed. One kernel per bank type
  // (float32 / float16) and execution provider; ONNX Runtime picks by the type of A_bank / B_bank.
  static Registry* r = [] {
    auto* reg = new Registry;
    auto add = [reg](Ort::Custom::OrtLiteCustomOp* op) {
      reg->domain.Add(in_place(op));
      reg->ops.push_back(op);
    };
    add(Ort::Custom::CreateLiteCustomOp("LoraDelta", "CPUExecutionProvider", LoraDeltaCpu<float>, infer_shape));
    add(Ort::Custom::CreateLiteCustomOp("LoraDelta", "CPUExecutionProvider", LoraDeltaCpu<Ort::Float16_t>,
                                        infer_shape));
#ifdef REWRITE_LORA_CUDA
    // The adapter ids are routing decisions made on the host: take them in host memory so the op can check them
    // (clean error) and plan without a device->host copy or a stream synchronisation.
    auto ids_on_host = [](Ort::Custom::OrtLiteCustomOp* op) {
      op->GetInputMemoryType = [](const OrtCustomOp*, size_t i) {
        return i == 3 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
      };
      return op;
    };
    add(ids_on_host(
        Ort::Custom::CreateLiteCustomOp("LoraDelta", "CUDAExecutionProvider", LoraDeltaCuda<float>, infer_shape)));
    add(ids_on_host(Ort::Custom::CreateLiteCustomOp("LoraDelta", "CUDAExecutionProvider",
                                                    LoraDeltaCuda<Ort::Float16_t>, infer_shape)));
#endif
    return reg;
  }();
  return *r;
}

}  // namespace
}  // namespace rewrite_lora

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)  // the runtime is older than the headers (1.21): report through the oldest API table
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "rewrite LoraDelta needs onnxruntime >= 1.21");
  Ort::InitApi(api);
  try {
    Ort::UnownedSessionOptions(options).Add(rewrite_lora::registry().domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
