require "sidekiq/middleware/current_attributes"
# Required, not autoloaded: initializers must not autoload app constants.
require Rails.root.join("lib", "example_server_middleware").to_s

# Sidekiq 6.4 calls Redis#sadd in a way redis-rb 4.8 warns about on every
# push; the warning is noise for anyone enqueueing from a shell. Sidekiq 7+
# talks to Redis through redis-client and does not load redis-rb at all.
Redis.silence_deprecations = true if defined?(Redis) && Redis.respond_to?(:silence_deprecations=)

# Only runs in a Sidekiq server process - or in gokiq-sidecar, which makes
# Sidekiq believe it is one. Evidence of both lands in the job_runs table.
Sidekiq.configure_server do |config|
  config.server_middleware do |chain|
    chain.add ExampleServerMiddleware
  end

  config.death_handlers << lambda do |job, ex|
    JobRun.create!(job_class: "death_handler", jid: job["jid"],
                   note: "#{job["class"]} #{ex.class}: #{ex.message}")
  end

  # Lifecycle evidence: one line "<event> <pid>" per hook run, appended to the
  # file named by GOKIQ_EXAMPLE_LIFECYCLE_LOG (a file, not the database: the
  # :shutdown hook must not depend on a connection the drain may be closing).
  if (lifecycle_log = ENV["GOKIQ_EXAMPLE_LIFECYCLE_LOG"])
    record = ->(event) { File.write(lifecycle_log, "#{event} #{Process.pid}\n", mode: "a") }
    config.on(:startup) { record.call(:startup) }
    config.on(:quiet) { record.call(:quiet) }
    config.on(:shutdown) { record.call(:shutdown) }
    config.on(:heartbeat) { record.call(:heartbeat) }
    begin
      config.on(:beat) { record.call(:beat) }
    rescue ArgumentError
      # :beat (every heartbeat) exists from Sidekiq 6.5 on.
    end
    # A broken hook is logged and must not stop the process.
    config.on(:startup) { raise "startup hook broke" } if ENV["GOKIQ_EXAMPLE_BROKEN_STARTUP_HOOK"]
  end
end

# after_initialize: Current is an autoloaded model, and referencing it from an
# initializer would autoload during boot (deprecated in Rails 6.1).
Rails.application.config.after_initialize do
  Sidekiq::CurrentAttributes.persist(Current)
end
