require "json"

module GokiqSidecar
  # One JSON object per line, so log shippers need no parsing rules. The lock
  # keeps lines from interleaving when many Puma threads log at once.
  #
  # Every job writes a line, so a line is built cheaply: one hash, and the
  # timestamp's date and time formatted once a second (Time#iso8601 per line
  # was a third of the line's cost).
  class JsonLogger
    LEVELS = {"debug" => 0, "info" => 1, "warn" => 2, "error" => 3}.freeze

    def initialize(io = $stdout, level: ENV.fetch("GOKIQ_LOG_LEVEL", "info"))
      @io = io
      @min = LEVELS.fetch(level.to_s.downcase, 1)
      @lock = Mutex.new
      @second = [nil, nil].freeze # [epoch second, its "YYYY-MM-DDTHH:MM:SS." in UTC]
    end

    %w[debug info warn error].each do |level|
      define_method(level) { |msg, **fields| log(level, msg, fields) }
    end

    def log(level, msg, fields = {})
      return if LEVELS.fetch(level) < @min
      record = {ts: timestamp, level: level, msg: msg}
      record.update(fields) unless fields.empty?
      line = JSON.generate(record) << "\n"
      @lock.synchronize do
        @io.write(line)
        @io.flush
      end
    rescue => e
      # A broken log device must never fail a job.
      warn "gokiq-sidecar: cannot log: #{e.class}: #{e.message}"
    end

    # Now in UTC, ISO 8601 with microseconds, as Time#iso8601(6) writes it.
    def timestamp
      micros = Process.clock_gettime(Process::CLOCK_REALTIME, :microsecond)
      second, usec = micros.divmod(1_000_000)
      cached = @second # one read: another thread may replace it meanwhile
      unless cached[0] == second
        cached = [second, Time.at(second).utc.strftime("%Y-%m-%dT%H:%M:%S.")].freeze
        @second = cached
      end
      format("%s%06dZ", cached[1], usec)
    end
  end
end
