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
//
// Damage is refused (kDataLoss, naming the file). Saving writes, beside the
// file and after it, `<path>.crc32` ("crc32=<8 hex digits> bytes=<n>"), so
// MXNet still reads the file itself. Loading verifies the checksum when that
// file exists and warns once per path when it does not (files from MXNet
// have none); bytes after the names are an error; so is a NaN or infinite
// value, naming the array and the element, unless allow_non_finite.
struct ParamsLoadOptions {
  Context ctx = cpu();
  bool allow_non_finite = false;
};
absl::Status SaveNDArrayList(const std::string& path, const NamedArrays& arrays);
absl::StatusOr<NamedArrays> LoadNDArrayList(const std::string& path,
                                             const ParamsLoadOptions& options = {});
std::string ChecksumPath(const std::string& params_path);

// Whether checkpoints can be written under `prefix` (its directory exists
// and takes a new file): checked before training, so that a bad prefix
// fails at start-up rather than after the first epoch.
absl::Status CheckCheckpointPrefix(const std::string& prefix);

struct Checkpoint {
  Symbol symbol;
  std::map<std::string, NDArray> arg_params;
  std::map<std::string, NDArray> aux_params;
};

std::string CheckpointParamsPath(const std::string& prefix, int epoch);
std::string CheckpointStatesPath(const std::string& prefix, int epoch);
// The row-sparse tables of a model that has them (FeedForward writes and
// reads it a row range at a time: worker/model.h).
std::string CheckpointTablesPath(const std::string& prefix, int epoch);

// Writes the symbol and the parameters of `epoch` (the optimizer state is
// written by the caller, who owns the optimizer).
absl::Status SaveCheckpoint(const std::string& prefix, int epoch,
                            const Symbol& symbol,
                            const std::map<std::string, NDArray>& arg_params,
                            const std::map<std::string, NDArray>& aux_params);
// Reads them back; names without an "arg:" or "aux:" prefix are an error.
absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& prefix, int epoch,
                                          const ParamsLoadOptions& options = {});

}  // namespace mx

#endif  // MX_WORKER_CHECKPOINT_H_
