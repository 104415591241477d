# Job classes that exist only in tests; they report the context they ran in.
class ProbeJob
  include Sidekiq::Worker
  class << self
    attr_accessor :seen
  end

  def perform(*args)
    ProbeJob.seen = {
      args: args,
      jid: jid,
      executor_active: Rails.application.executor.active?,
      middleware: ExampleServerMiddleware.active?,
      user_id: Current.user_id,
      context: Thread.current[:sidekiq_context]&.dup,
      connection_checked_out: (ActiveRecord::Base.connection.execute("select 1") && ActiveRecord::Base.connection_pool.active_connection?)
    }
  end
end

class CountingRetryJob
  include Sidekiq::Worker
  sidekiq_options retry: 7
  sidekiq_retry_in { |count, _ex| count * 10 + 1 }

  def perform
    raise "counting"
  end
end

# 7.1+ passes the job hash as a third argument; 6.x and 7.0 pass two.
class ThreeArgumentRetryInJob
  include Sidekiq::Worker
  sidekiq_retry_in { |count, _ex, job| job ? 100 + job["args"].first + count : 50 }

  def perform(_n)
    raise "three"
  end
end

# The size of the Redis pool `Sidekiq.redis` gives this job.
class RedisPoolJob
  include Sidekiq::Worker
  class << self
    attr_accessor :size
  end

  def perform
    RedisPoolJob.size = Sidekiq.redis_pool.size
  end
end

class RaisingRetryInJob
  include Sidekiq::Worker
  sidekiq_retry_in { |_count, _ex| raise "broken block" }

  def perform
    raise "x"
  end
end

class ZeroRetryInJob
  include Sidekiq::Worker
  sidekiq_retry_in { |_count, _ex| 0 }

  def perform
    raise "x"
  end
end

class BinaryMessageJob
  include Sidekiq::Worker

  def perform(size)
    raise RuntimeError, ("\xff\xfeok".b * size)
  end
end

class BlockingJob
  include Sidekiq::Worker
  STARTED = Queue.new
  RELEASE = Queue.new

  def perform
    STARTED << true
    RELEASE.pop
  end
end

class DiscardingExhaustedJob
  include Sidekiq::Worker
  sidekiq_retries_exhausted { |_job, _ex| :discard }

  def perform
  end
end

class RaisingExhaustedJob
  include Sidekiq::Worker
  sidekiq_retries_exhausted { |_job, _ex| raise "hook broke" }

  def perform
  end
end

class NotAJob
  class << self
    attr_accessor :instantiated
  end

  def initialize
    NotAJob.instantiated = true
  end
end

module Namespaced
  class InnerJob
    include Sidekiq::Worker

    def perform(x)
      JobRun.record!(job_class: "Namespaced::InnerJob", jid: jid, args: [x])
    end
  end
end

class AjRetryJob < ApplicationJob
  sidekiq_options retry: 4
  sidekiq_retry_in { |count, _ex| 100 + count }
  sidekiq_retries_exhausted do |job, ex|
    JobRun.create!(job_class: "AjRetryJob.exhausted", jid: job["jid"], note: "#{ex.class}: #{ex.message}")
  end

  def perform(*)
    raise ArgumentError, "aj boom"
  end
end

# Stands for a server middleware that dealt with the job itself, as 7.3+'s
# InterruptHandler does when it pushes an interrupted iterable job back.
class HandledElsewhereJob
  include Sidekiq::Worker

  def perform
    raise Sidekiq::JobRetry::Skip
  end
end

# What an iterable job asks between two iterations (Sidekiq 7.3+'s Job#interrupted?).
class InterruptProbeJob
  include Sidekiq::Worker
  class << self
    attr_accessor :interrupted
  end

  def perform
    InterruptProbeJob.interrupted = interrupted?
  end
end
