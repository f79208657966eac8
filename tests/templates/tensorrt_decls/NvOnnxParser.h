/*
 * A MINIMAL DECLARATION SET, NOT NVIDIA'S HEADER: the part of TensorRT 10's ONNX parser API
 * (nvonnxparser namespace) that the generated runtime uses, written by apq-sdk from the
 * documented API for syntax checks only. See NvInfer.h beside it.
 */
#ifndef APQ_MINIMAL_NVONNXPARSER_H
#define APQ_MINIMAL_NVONNXPARSER_H

#include "NvInfer.h"

namespace nvonnxparser {

class IParserError {
 public:
  virtual char const* desc() const = 0;
  virtual ~IParserError() = default;
};

class IParser {
 public:
  virtual bool parseFromFile(char const* onnxModelFile, int verbosity) = 0;
  virtual int getNbErrors() const = 0;
  virtual IParserError const* getError(int index) const = 0;
  virtual ~IParser() noexcept = default;
};

IParser* createParser(nvinfer1::INetworkDefinition& network, nvinfer1::ILogger& logger) noexcept;

}  // namespace nvonnxparser

#endif  // APQ_MINIMAL_NVONNXPARSER_H
