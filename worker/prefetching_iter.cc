// PrefetchingIter: one background thread calls the inner iterator's Next()
// and copies each batch into one of two slots, so that the next batch is
// ready while the caller works on the current one (double buffering).
//
// Slots. Each slot is at any time in exactly one place: free_, being
// filled by the thread (busy_), ready_, or current_ (handed to the caller
// and valid until its next Next() or Reset()). The copy from the inner
// iterator's arrays is an engine operation, so a slot that the caller's
// pushed operations still read is overwritten only after them.
//
// Errors. An exception from the inner iterator ends the epoch on the
// thread; the caller's Next() rethrows it after the batches that came before
// it, and returns false afterwards until Reset().
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#include "ndarray/engine.h"
#include "worker/io.h"

namespace mx {

namespace {

class Prefetcher : public DataIter {
 public:
  explicit Prefetcher(std::unique_ptr<DataIter> inner)
      : inner_(std::move(inner)),
        data_desc_(inner_->ProvideData()),
        label_desc_(inner_->ProvideLabel()),
        batch_size_(inner_->batch_size()),
        num_samples_(inner_->num_samples()),
        thread_([this] { Run(); }) {}

  ~Prefetcher() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  void Reset() override {
    std::unique_lock<std::mutex> lock(mu_);
    // As for every iterator, a Reset() before this epoch's first Next() is
    // not an epoch: the batches fetched so far are its first ones. (Resetting
    // the inner iterator here would count an epoch whenever the thread had
    // already fetched, making the shuffle order depend on timing.)
    if (!started_) return;
    started_ = false;
    paused_ = true;
    cv_.wait(lock, [this] { return !busy_; });
    for (int slot : ready_) free_.push_back(slot);
    ready_.clear();
    if (current_ >= 0) free_.push_back(current_);
    current_ = -1;
    error_ = nullptr;
    lock.unlock();

    // The thread is paused and idle, so the inner iterator is ours.
    std::exception_ptr reset_error;
    try {
      inner_->Reset();
    } catch (...) {
      reset_error = std::current_exception();
    }

    lock.lock();
    paused_ = false;
    epoch_done_ = reset_error != nullptr;
    lock.unlock();
    cv_.notify_all();
    if (reset_error) std::rethrow_exception(reset_error);
  }

  bool Next(DataBatch* batch) override {
    std::unique_lock<std::mutex> lock(mu_);
    started_ = true;
    if (current_ >= 0) {
      free_.push_back(current_);
      current_ = -1;
      cv_.notify_all();
    }
    cv_.wait(lock, [this] { return !ready_.empty() || epoch_done_; });
    if (!ready_.empty()) {
      current_ = ready_.front();
      ready_.pop_front();
      const Slot& slot = slots_[current_];
      batch->data = slot.data;
      batch->label = slot.label;
      batch->pad = slot.pad;
      return true;
    }
    if (error_ != nullptr) {
      std::exception_ptr error = std::move(error_);
      error_ = nullptr;
      std::rethrow_exception(error);
    }
    return false;
  }

  std::vector<DataDesc> ProvideData() const override { return data_desc_; }
  std::vector<DataDesc> ProvideLabel() const override { return label_desc_; }
  int batch_size() const override { return batch_size_; }
  int64_t num_samples() const override { return num_samples_; }

 private:
  struct Slot {
    std::vector<NDArray> data;
    std::vector<NDArray> label;
    int pad = 0;
  };

  // Copies src into dst, reusing dst's arrays when their shapes fit.
  static void CopyArrays(const std::vector<NDArray>& src,
                         std::vector<NDArray>* dst) {
    dst->resize(src.size());
    for (size_t i = 0; i < src.size(); ++i) {
      NDArray& d = (*dst)[i];
      if (d.is_none() || d.shape() != src[i].shape() ||
          d.context() != src[i].context()) {
        d = NDArray(src[i].shape(), src[i].context());
      }
      d.Assign(src[i]);
    }
  }

  void Run() {
    // This thread's waits (the inner iterator's for its arrays) are off the
    // caller's training step: they must not take its operations over.
    WaitWithoutRunning off_the_step;
    DataBatch batch;  // the inner iterator's arrays
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] {
        return stop_ || (!paused_ && !epoch_done_ && !free_.empty());
      });
      if (stop_) return;
      const int slot = free_.back();
      free_.pop_back();
      busy_ = true;
      lock.unlock();

      bool more = false;
      std::exception_ptr error;
      try {
        more = inner_->Next(&batch);
        if (more) {
          CopyArrays(batch.data, &slots_[slot].data);
          CopyArrays(batch.label, &slots_[slot].label);
          slots_[slot].pad = batch.pad;
        }
      } catch (...) {
        error = std::current_exception();
      }

      lock.lock();
      busy_ = false;
      if (more && error == nullptr) {
        ready_.push_back(slot);
      } else {
        free_.push_back(slot);
        epoch_done_ = true;
        error_ = error;
      }
      cv_.notify_all();
    }
  }

  const std::unique_ptr<DataIter> inner_;
  const std::vector<DataDesc> data_desc_;
  const std::vector<DataDesc> label_desc_;
  const int batch_size_;
  const int64_t num_samples_;

  // A slot's contents belong to whoever holds its index (see the top).
  Slot slots_[2];

  std::mutex mu_;
  std::condition_variable cv_;
  // State below is protected by mu_.
  std::vector<int> free_ = {0, 1};
  std::deque<int> ready_;
  int current_ = -1;
  bool busy_ = false;        // the thread is inside inner_->Next()
  bool paused_ = false;      // Reset() owns the inner iterator
  bool epoch_done_ = false;  // the inner iterator ended the epoch or failed
  bool stop_ = false;
  bool started_ = false;     // Next() was called since the last Reset()
  std::exception_ptr error_;  // to rethrow from Next()

  std::thread thread_;  // last: starts after everything above exists
};

}  // namespace

std::unique_ptr<DataIter> PrefetchingIter(std::unique_ptr<DataIter> inner) {
  MX_THROW_IF_NOT(inner != nullptr,
                  "PrefetchingIter: the inner iterator is null");
  return std::make_unique<Prefetcher>(std::move(inner));
}

}  // namespace mx
