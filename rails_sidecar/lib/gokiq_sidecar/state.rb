require "set"

module GokiqSidecar
  # Process lifecycle (booting -> ready -> draining) and the jids running now.
  # Jobs are only accepted when ready; the jid set answers "is this job
  # already running here?" so an at-least-once redelivery is not run twice
  # concurrently in one process.
  class State
    attr_reader :phase, :boot_error

    def initialize(phase = :booting)
      @phase = phase
      @lock = Mutex.new
      @running = Set.new
    end

    def ready!
      @phase = :ready
    end

    def draining!
      @phase = :draining
    end

    def boot_failed!(error)
      @boot_error = error
    end

    def ready?
      @phase == :ready
    end

    # What a job's `interrupted?` asks (Sidekiq 7.3+'s Job#_context, which Sidekiq
    # sets to its processor): an iterable job stops at its next iteration once
    # the sidecar drains, and goes back to its queue from where it was.
    def stopping?
      @phase == :draining
    end

    # Returns false when the jid is already running. A nil jid is never a duplicate.
    def claim(jid)
      return true if jid.nil?
      @lock.synchronize { @running.add?(jid) ? true : false }
    end

    def release(jid)
      return if jid.nil?
      @lock.synchronize { @running.delete(jid) }
    end

    def running_count
      @lock.synchronize { @running.size }
    end
  end
end
