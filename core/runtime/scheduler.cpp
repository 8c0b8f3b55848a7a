// SPDX-License-Identifier: Apache-2.0
#include "core/runtime/scheduler.h"

#include <algorithm>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cmath>

#include "core/runtime/runtime.h"

namespace tidal::runtime {

namespace asio = boost::asio;

void SchedulerOptions::validate() const {
  TIDAL_CHECK(max_batch >= 1, InvalidArgument, "max_batch must be at least 1, got {}", max_batch);
  TIDAL_CHECK(max_requests >= 1, InvalidArgument, "max_requests must be at least 1, got {}",
              max_requests);
  TIDAL_CHECK(prefill_chunk >= 1, InvalidArgument, "prefill_chunk must be at least 1, got {}",
              prefill_chunk);
  TIDAL_CHECK(std::isfinite(batch_wait) && batch_wait >= 0 && batch_wait <= 1, InvalidArgument,
              "batch_wait must be between 0 and 1 second, got {}", batch_wait);
}

void SequenceControl::check() {
  if (cancelled.exchange(false)) throw Cancelled("the sequence was cancelled");
  const int64_t d = deadline_ns.load();
  if (d != 0 && std::chrono::steady_clock::now().time_since_epoch().count() > d)
    throw DeadlineExceeded("the request's deadline passed");
}

struct Scheduler::Job {
  core::SequenceState* state = nullptr;
  std::span<const int64_t> ids;
  core::LogitsMode mode = core::LogitsMode::kLast;
  std::vector<float>* out = nullptr;
  Sampler* sampler = nullptr;
  SequenceControl* ctl = nullptr;
  core::ForwardProfile prof;
  double sample_seconds = 0;
  int64_t tok = -1;
  size_t offset = 0;  // prompt tokens already prefilled
  Clock::time_point enqueued;
  bool finished = false;
  std::promise<void> done;

  bool is_decode() const { return ids.size() == 1 && mode == core::LogitsMode::kLast; }
  void finish() {
    finished = true;
    done.set_value();
  }
  void fail(std::exception_ptr e) {
    finished = true;
    done.set_exception(std::move(e));
  }
};

struct Scheduler::Impl {
  asio::io_context ioc;
  asio::executor_work_guard<asio::io_context::executor_type> guard{ioc.get_executor()};
  asio::steady_timer timer{ioc};
  std::thread thread;
  // Everything below is touched on the executor thread only.
  std::deque<std::shared_ptr<Job>> decode_q, prefill_q;
  std::unordered_set<const core::SequenceState*> expected;  // the last batch's sequences
  bool scheduled = false, timer_armed = false, last_was_prefill = false, stopping = false;
};

Scheduler::Scheduler(const Runtime& rt, const SchedulerOptions& opts)
    : rt_(rt), opts_(opts), impl_(std::make_unique<Impl>()) {
  opts_.validate();
  max_batch_ = std::max<int64_t>(1, std::min(opts_.max_batch, rt_.model().max_batch()));
  impl_->thread = std::thread([this] { impl_->ioc.run(); });
}

Scheduler::~Scheduler() {
  post([this] {
    Impl& m = *impl_;
    m.stopping = true;
    m.timer.cancel();
    auto err = std::make_exception_ptr(Cancelled("the runtime's scheduler stopped"));
    for (auto* q : {&m.decode_q, &m.prefill_q}) {
      for (auto& j : *q) j->fail(err);
      q->clear();
    }
  });
  impl_->guard.reset();
  impl_->thread.join();
}

void Scheduler::post(std::function<void()> fn) { asio::post(impl_->ioc, std::move(fn)); }

void Scheduler::Admission::release() {
  if (!released_.exchange(true)) {
    s_->active_.fetch_sub(1);
    std::lock_guard lock(s_->stats_mu_);
    --s_->stats_.active_requests;
  }
}

std::unique_ptr<Scheduler::Admission> Scheduler::try_admit() {
  const int64_t before = active_.fetch_add(1);
  if (before >= opts_.max_requests) {
    active_.fetch_sub(1);
    std::lock_guard lock(stats_mu_);
    ++stats_.rejected;
    throw Busy(fmt::format("the server is busy: {} requests are running (max_requests={})", before,
                           opts_.max_requests));
  }
  {
    std::lock_guard lock(stats_mu_);
    ++stats_.admitted;
    ++stats_.active_requests;
  }
  return std::make_unique<Admission>(this);
}

int64_t Scheduler::run(core::SequenceState& state, std::span<const int64_t> ids,
                       core::LogitsMode mode, std::vector<float>& out, Sampler* sampler,
                       SequenceControl& ctl, core::ForwardProfile& prof, double& sample_seconds) {
  auto job = std::make_shared<Job>();
  job->state = &state;
  job->ids = ids;
  job->mode = mode;
  job->out = &out;
  job->sampler = sampler;
  job->ctl = &ctl;
  auto fut = job->done.get_future();
  post([this, job] {
    Impl& m = *impl_;
    if (m.stopping) {
      job->fail(std::make_exception_ptr(Cancelled("the runtime's scheduler stopped")));
      return;
    }
    job->enqueued = Clock::now();
    try {
      (job->is_decode() ? m.decode_q : m.prefill_q).push_back(job);
    } catch (...) {
      job->fail(std::current_exception());
      return;
    }
    {
      std::lock_guard lock(stats_mu_);
      stats_.queued = static_cast<int64_t>(m.decode_q.size() + m.prefill_q.size());
    }
    if (!m.scheduled) {
      m.scheduled = true;
      post([this] { turn(); });
    }
  });
  fut.get();  // rethrows this call's error
  prof.routed_experts += job->prof.routed_experts;
  prof.total += job->prof.total;
  sample_seconds += job->sample_seconds;
  return job->tok;
}

void Scheduler::forget(const core::SequenceState* state) {
  post([this, state] { impl_->expected.erase(state); });
}

void Scheduler::poke() {
  post([this] {
    if (!impl_->scheduled) {
      impl_->scheduled = true;
      post([this] { turn(); });
    }
  });
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard lock(stats_mu_);
  return stats_;
}

bool Scheduler::check_job(Job& job) {
  try {
    job.ctl->check();
    return true;
  } catch (const Cancelled&) {
    std::lock_guard lock(stats_mu_);
    ++stats_.cancelled;
    job.fail(std::current_exception());
  } catch (const DeadlineExceeded&) {
    std::lock_guard lock(stats_mu_);
    ++stats_.deadline_exceeded;
    job.fail(std::current_exception());
  }
  return false;
}

void Scheduler::turn() {
  try {
    turn_unsafe();
  } catch (...) {  // never let an error end the executor thread: fail what is queued instead
    Impl& m = *impl_;
    auto err = std::current_exception();
    for (auto* q : {&m.decode_q, &m.prefill_q}) {
      for (auto& j : *q)
        if (!j->finished) j->fail(err);
      q->clear();
    }
    m.scheduled = false;
  }
}

void Scheduler::turn_unsafe() {
  Impl& m = *impl_;
  m.scheduled = false;
  if (m.stopping) return;
  for (auto* q : {&m.decode_q, &m.prefill_q})
    q->erase(std::remove_if(q->begin(), q->end(), [&](auto& j) { return !check_job(*j); }),
             q->end());
  if (!m.decode_q.empty()) {
    bool all_in = true;  // has every sequence of the last batch sent its next step?
    for (const auto* s : m.expected) {
      const bool in =
          std::any_of(m.decode_q.begin(), m.decode_q.end(), [&](auto& j) { return j->state == s; });
      if (!in) {
        all_in = false;
        break;
      }
    }
    const auto due =
        m.decode_q.front()->enqueued + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(opts_.batch_wait));
    const bool go = all_in || Clock::now() >= due ||
                    static_cast<int64_t>(m.decode_q.size()) >= max_batch_ ||
                    (!m.prefill_q.empty() && m.last_was_prefill);
    if (go) {
      std::vector<std::shared_ptr<Job>> batch;
      while (!m.decode_q.empty() && static_cast<int64_t>(batch.size()) < max_batch_) {
        batch.push_back(m.decode_q.front());
        m.decode_q.pop_front();
      }
      m.expected.clear();
      for (auto& j : batch) m.expected.insert(j->state);
      for (auto& j : m.decode_q) m.expected.insert(j->state);
      run_decode(batch);
      m.last_was_prefill = false;
    } else if (m.prefill_q.empty()) {  // wait for the others, at most until `due`
      if (!m.timer_armed) {
        m.timer_armed = true;
        m.timer.expires_at(due);
        m.timer.async_wait([this](const boost::system::error_code&) {
          impl_->timer_armed = false;
          if (!impl_->scheduled) {
            impl_->scheduled = true;
            turn();
          }
        });
      }
      std::lock_guard lock(stats_mu_);
      stats_.queued = static_cast<int64_t>(m.decode_q.size() + m.prefill_q.size());
      return;
    }
  }
  if (!m.prefill_q.empty() && !m.last_was_prefill) {
    auto job = m.prefill_q.front();
    m.prefill_q.pop_front();
    run_prefill_chunk(*job);
    if (!job->finished) m.prefill_q.push_back(job);  // round robin over prompts
    m.last_was_prefill = !m.decode_q.empty();
  } else if (!m.prefill_q.empty() && m.decode_q.empty()) {
    m.last_was_prefill = false;
  }
  {
    std::lock_guard lock(stats_mu_);
    stats_.queued = static_cast<int64_t>(m.decode_q.size() + m.prefill_q.size());
  }
  if ((!m.decode_q.empty() || !m.prefill_q.empty()) && !m.scheduled) {
    m.scheduled = true;
    post([this] { turn(); });
  }
}

void Scheduler::run_decode(std::vector<std::shared_ptr<Job>>& batch) {
  const core::Model& model = rt_.model();
  // Room for one more token in each sequence first: a sequence that cannot grow fails alone.
  std::vector<std::shared_ptr<Job>> ok;
  for (auto& j : batch) {
    try {
      model.reserve(*j->state, j->state->num_tokens + 1);
      ok.push_back(j);
    } catch (...) {
      {
        std::lock_guard lock(stats_mu_);
        ++stats_.failed;
      }
      j->fail(std::current_exception());
    }
  }
  if (ok.empty()) return;
  const auto B = static_cast<int64_t>(ok.size());
  std::vector<core::SequenceState*> states;
  std::vector<int64_t> ids;
  for (auto& j : ok) {
    states.push_back(j->state);
    ids.push_back(j->ids[0]);
  }
  core::ForwardProfile prof;
  std::vector<float> logits;
  try {
    model.forward_batch(states, ids, logits, rt_.executor(), &prof);
  } catch (...) {
    {
      std::lock_guard lock(stats_mu_);
      stats_.failed += B;
    }
    for (auto& j : ok) j->fail(std::current_exception());
    return;
  }
  const int64_t V = model.config().vocab_size;
  std::vector<std::exception_ptr> errs(ok.size());
  rt_.executor().parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Job& j = *ok[b];
      j.out->assign(logits.begin() + b * V, logits.begin() + (b + 1) * V);
      j.prof.routed_experts = prof.routed_experts / static_cast<double>(B);
      j.prof.total = prof.total / static_cast<double>(B);
      if (j.sampler) {
        const auto t0 = Clock::now();
        try {
          j.tok = j.sampler->sample(*j.out);
        } catch (...) {
          errs[b] = std::current_exception();
        }
        j.sample_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      }
    }
  });
  {
    std::lock_guard lock(stats_mu_);
    ++stats_.decode_steps;
    stats_.decode_rows += B;
    stats_.max_rows = std::max(stats_.max_rows, B);
  }
  for (size_t b = 0; b < ok.size(); ++b) {
    if (errs[b])
      ok[b]->fail(errs[b]);
    else
      ok[b]->finish();
  }
}

void Scheduler::run_prefill_chunk(Job& job) {
  const core::Model& model = rt_.model();
  const size_t total = job.ids.size();
  const size_t n = std::min<size_t>(static_cast<size_t>(opts_.prefill_chunk), total - job.offset);
  const bool last = job.offset + n == total;
  const auto mode = job.mode == core::LogitsMode::kAll ? core::LogitsMode::kAll
                    : last                             ? job.mode
                                                       : core::LogitsMode::kNone;
  try {
    std::vector<float> part;
    model.forward(job.ids.subspan(job.offset, n), *job.state, mode, part, rt_.executor(),
                  &job.prof);
    if (job.offset == 0) job.out->clear();
    if (mode != core::LogitsMode::kNone) job.out->insert(job.out->end(), part.begin(), part.end());
    job.offset += n;
    {
      std::lock_guard lock(stats_mu_);
      ++stats_.prefill_chunks;
    }
    if (!last) return;
    if (job.sampler) {
      const auto t0 = Clock::now();
      job.tok = job.sampler->sample(*job.out);
      job.sample_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    job.finish();
  } catch (...) {
    {
      std::lock_guard lock(stats_mu_);
      ++stats_.failed;
    }
    job.fail(std::current_exception());
  }
}

}  // namespace tidal::runtime
