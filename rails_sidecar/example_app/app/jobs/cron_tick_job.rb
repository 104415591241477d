# Enqueued every minute by sidekiq-cron (config/initializers/cron.rb). `date_as_argument`
# makes the gem pass the time it enqueued the tick, so each run says which minute it belongs to.
class CronTickJob
  include Sidekiq::Worker

  def perform(enqueued_at)
    JobRun.record!(job_class: "CronTickJob", jid: jid, args: [enqueued_at])
  end
end
