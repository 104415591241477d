# Fails the first `failures` runs for `key`, then succeeds. Attempts are
# counted in the db (insert first, then count: no read-then-write transaction,
# which sqlite in WAL mode could refuse with SQLITE_BUSY_SNAPSHOT).
class FlakyJob
  include Sidekiq::Worker

  def perform(key, failures)
    FlakyAttempt.create!(key: key)
    n = FlakyAttempt.where(key: key).count
    raise "flaky #{n}" if n <= failures.to_i
    JobRun.record!(job_class: "FlakyJob", jid: jid, args: [key, failures], note: "attempt #{n}")
  end
end
