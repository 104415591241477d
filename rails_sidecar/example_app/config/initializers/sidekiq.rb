require "sidekiq/middleware/current_attributes"
# Required, not autoloaded: initializers must not autoload app constants.
require Rails.root.join("lib", "example_server_middleware").to_s

# Sidekiq 6.4 calls Redis#sadd in a way redis-rb 4.8 warns about on every
# push; the warning is noise for anyone enqueueing from a shell.
Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)

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
end

# after_initialize: Current is an autoloaded model, and referencing it from an
# initializer would autoload during boot (deprecated in Rails 6.1).
Rails.application.config.after_initialize do
  Sidekiq::CurrentAttributes.persist(Current)
end
