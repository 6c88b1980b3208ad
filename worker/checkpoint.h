// Checkpoints in MXNet's layout, so that models move between MXNet and mx:
//   <prefix>-symbol.json    the symbol (MXNet 1.x JSON)
//   <prefix>-<epoch>.params the parameters, MXNet's NDArray list format
//                           with names "arg:<name>" and "aux:<name>"
//   <prefix>-<epoch>.states the optimizer state (mx's own format)
// <epoch> is written with four digits (model-0003.params), as MXNet does.
#ifndef MX_WORKER_CHECKPOINT_H_
#define MX_WORKER_CHECKPOINT_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "graph/symbol.h"
#include "ndarray/ndarray.h"

namespace mx {

// MXNet's NDArray list file (mx.nd.save / mx.nd.load): header 0x112, a
// reserved word, the arrays (V2 records: magic 0xF993FAC9, dense storage,
// shape, context, float32 type, data), then the names. Loading also accepts
// V1 records (magic 0xF993FAC8) and the pre-V1 layout. Only float32 arrays
// are supported; other types are an error naming the array.
absl::Status SaveNDArrayList(const std::string& path, const NamedArrays& arrays);
absl::StatusOr<NamedArrays> LoadNDArrayList(const std::string& path,
                                             Context ctx = cpu());

struct Checkpoint {
  Symbol symbol;
  std::map<std::string, NDArray> arg_params;
  std::map<std::string, NDArray> aux_params;
};

std::string CheckpointParamsPath(const std::string& prefix, int epoch);
std::string CheckpointStatesPath(const std::string& prefix, int epoch);

// Writes the symbol and the parameters of `epoch` (the optimizer state is
// written by the caller, who owns the optimizer).
absl::Status SaveCheckpoint(const std::string& prefix, int epoch,
                            const Symbol& symbol,
                            const std::map<std::string, NDArray>& arg_params,
                            const std::map<std::string, NDArray>& aux_params);
// Reads them back; names without an "arg:" or "aux:" prefix are an error.
absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& prefix, int epoch);

}  // namespace mx

#endif  // MX_WORKER_CHECKPOINT_H_
