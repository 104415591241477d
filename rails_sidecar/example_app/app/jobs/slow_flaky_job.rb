# Its first run sleeps `ms`, then raises; every later run succeeds. A first run longer than
# gokiq's job_timeout is still running when its retry reaches the sidecar (which answers 409).
class SlowFlakyJob
  include Sidekiq::Worker

  def perform(key, ms)
    FlakyAttempt.create!(key: key)
    if FlakyAttempt.where(key: key).count == 1
      sleep(ms.to_f / 1000)
      raise "slow first run"
    end
    JobRun.record!(job_class: "SlowFlakyJob", jid: jid, args: [key, ms])
  end
end
