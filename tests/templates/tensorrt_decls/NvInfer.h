/*
 * A MINIMAL DECLARATION SET, NOT NVIDIA'S HEADER. Written by apq-sdk from the documented
 * TensorRT 10 C++ API (nvinfer1 namespace, docs.nvidia.com/deeplearning/tensorrt/latest/
 * _static/c-api/) for syntax-checking the generated runtime where TensorRT's own headers
 * cannot be had (its packages download from a host this build machine cannot reach).
 * It declares only what templates/tensorrt/src/apq_model.cpp uses, with TensorRT 10's
 * signatures; it links to nothing. Compiling against it proves the generated code is valid
 * C++ for these declarations, not that it builds against the real headers.
 */
#ifndef APQ_MINIMAL_NVINFER_H
#define APQ_MINIMAL_NVINFER_H

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace nvinfer1 {

using AsciiChar = char;

class ILogger {
 public:
  enum class Severity : int32_t { kINTERNAL_ERROR = 0, kERROR = 1, kWARNING = 2, kINFO = 3, kVERBOSE = 4 };
  virtual void log(Severity severity, AsciiChar const* msg) noexcept = 0;
  ILogger() = default;
  virtual ~ILogger() = default;
};

class Dims64 {
 public:
  static constexpr int32_t MAX_DIMS{8};
  int32_t nbDims;
  int64_t d[MAX_DIMS];
};
using Dims = Dims64;

enum class OptProfileSelector : int32_t { kMIN = 0, kOPT = 1, kMAX = 2 };
enum class BuilderFlag : int32_t { kFP16 = 0, kINT8 = 1 };
enum class TensorIOMode : int32_t { kNONE = 0, kINPUT = 1, kOUTPUT = 2 };
using NetworkDefinitionCreationFlags = uint32_t;

class IHostMemory {
 public:
  virtual ~IHostMemory() noexcept = default;
  void* data() const noexcept;
  std::size_t size() const noexcept;
};

class INetworkDefinition {
 public:
  virtual ~INetworkDefinition() noexcept = default;
};

class IOptimizationProfile {
 public:
  bool setDimensions(char const* inputName, OptProfileSelector select, Dims const& dims) noexcept;
};

class IBuilderConfig {
 public:
  virtual ~IBuilderConfig() noexcept = default;
  void setFlag(BuilderFlag builderFlag) noexcept;
  int32_t addOptimizationProfile(IOptimizationProfile const* profile) noexcept;
};

class IBuilder {
 public:
  virtual ~IBuilder() noexcept = default;
  INetworkDefinition* createNetworkV2(NetworkDefinitionCreationFlags flags) noexcept;
  IBuilderConfig* createBuilderConfig() noexcept;
  IOptimizationProfile* createOptimizationProfile() noexcept;
  IHostMemory* buildSerializedNetwork(INetworkDefinition& network, IBuilderConfig& config) noexcept;
};

class IExecutionContext {
 public:
  virtual ~IExecutionContext() noexcept = default;
  bool setOptimizationProfileAsync(int32_t profileIndex, cudaStream_t stream) noexcept;
  bool setInputShape(char const* tensorName, Dims const& dims) noexcept;
  bool setTensorAddress(char const* tensorName, void* data) noexcept;
  bool enqueueV3(cudaStream_t stream) noexcept;
};

class ICudaEngine {
 public:
  virtual ~ICudaEngine() noexcept = default;
  IExecutionContext* createExecutionContext() noexcept;
  int32_t getNbOptimizationProfiles() const noexcept;
};

class IRuntime {
 public:
  virtual ~IRuntime() noexcept = default;
  ICudaEngine* deserializeCudaEngine(void const* blob, std::size_t size) noexcept;
};

IBuilder* createInferBuilder(ILogger& logger) noexcept;
IRuntime* createInferRuntime(ILogger& logger) noexcept;

}  // namespace nvinfer1

extern "C" int32_t getInferLibVersion() noexcept;

#endif  // APQ_MINIMAL_NVINFER_H
