class FailJob
  include Sidekiq::Worker
  sidekiq_options retry: 2, backtrace: 5

  sidekiq_retries_exhausted do |job, ex|
    JobRun.create!(job_class: "FailJob.exhausted", jid: job["jid"], note: "#{ex.class}: #{ex.message}")
  end

  def perform(*)
    raise ArgumentError, "boom"
  end
end
