require "json"
require "time"

module GokiqSidecar
  # One JSON object per line, so log shippers need no parsing rules. The lock
  # keeps lines from interleaving when many Puma threads log at once.
  class JsonLogger
    LEVELS = {"debug" => 0, "info" => 1, "warn" => 2, "error" => 3}.freeze

    def initialize(io = $stdout, level: ENV.fetch("GOKIQ_LOG_LEVEL", "info"))
      @io = io
      @min = LEVELS.fetch(level.to_s.downcase, 1)
      @lock = Mutex.new
    end

    %w[debug info warn error].each do |level|
      define_method(level) { |msg, **fields| log(level, msg, fields) }
    end

    def log(level, msg, fields = {})
      return if LEVELS.fetch(level) < @min
      line = JSON.generate({ts: Time.now.utc.iso8601(6), level: level, msg: msg}.merge(fields))
      @lock.synchronize do
        @io.write(line, "\n")
        @io.flush
      end
    rescue => e
      # A broken log device must never fail a job.
      warn "gokiq-sidecar: cannot log: #{e.class}: #{e.message}"
    end
  end
end
