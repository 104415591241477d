# The app's periodic jobs, with sidekiq-cron (as its README shows: Sidekiq::Cron::Job.create
# where the app boots in server mode). Whichever process polls first enqueues a tick: a Ruby
# `sidekiq`, or gokiq-sidecar, which runs the gem's poller as Sidekiq's launcher does.
#
# Off unless GOKIQ_EXAMPLE_CRON=1, so that the other tests' job counts see no extra job.
# GOKIQ_EXAMPLE_CRON_POLL_INTERVAL shortens the gem's poll interval (default 30 s) for tests.
if ENV["GOKIQ_EXAMPLE_CRON"] == "1" && defined?(Sidekiq::Cron) # see config/application.rb
  if ENV["GOKIQ_EXAMPLE_CRON_POLL_INTERVAL"].present?
    Sidekiq::Options[:cron_poll_interval] = Integer(ENV["GOKIQ_EXAMPLE_CRON_POLL_INTERVAL"])
  end

  # after_initialize: the job's class must be loaded for the gem to read its sidekiq_options.
  Rails.application.config.after_initialize do
    if Sidekiq.server?
      # Saving keeps the job's status and last enqueue time from Redis, so a job disabled in
      # the Web UI stays disabled when a process restarts.
      Sidekiq::Cron::Job.create(name: "example_minute_tick", cron: "* * * * *",
                                class: "CronTickJob", date_as_argument: true,
                                description: "Records a JobRun every minute")
    end
  end
end
