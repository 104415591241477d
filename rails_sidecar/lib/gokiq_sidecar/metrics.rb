module GokiqSidecar
  # Prometheus text exposition written by hand (no client gem on the target
  # machines). Per process: under `--workers N` each Puma worker has its own.
  class Metrics
    # job_duration_seconds; gokiq's worker histogram has the same (DURATION_BUCKETS).
    BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300].freeze
    # Class labels are resolved class names (App), so they are bounded by the app's classes;
    # this caps them anyway, so no app, however large, grows a scrape without bound.
    MAX_CLASSES = 500
    OTHER = "(other)".freeze

    def initialize
      @lock = Mutex.new
      @jobs = Hash.new(0)          # [class, outcome] => count
      @exhausted = Hash.new(0)     # class => count
      @classes = {}                # class labels in use
      @in_progress = 0
      @bucket_counts = Array.new(BUCKETS.size, 0)
      @duration_sum = 0.0
      @duration_count = 0
    end

    def job_started
      @lock.synchronize { @in_progress += 1 }
    end

    def job_finished(klass, outcome, duration)
      @lock.synchronize do
        @in_progress -= 1
        record(klass, outcome, duration)
      end
    end

    # Outcomes that never ran a job (invalid class, duplicate) are counted
    # but kept out of the duration histogram.
    def job_rejected(klass, outcome)
      @lock.synchronize { @jobs[[bounded(klass), outcome]] += 1 }
    end

    def exhausted(klass)
      @lock.synchronize { @exhausted[bounded(klass)] += 1 }
    end

    def to_prometheus
      @lock.synchronize do
        out = []
        out << "# HELP gokiq_sidecar_jobs_total Jobs handled, by class and outcome."
        out << "# TYPE gokiq_sidecar_jobs_total counter"
        @jobs.each { |(k, o), n| out << "gokiq_sidecar_jobs_total{class=\"#{esc(k)}\",outcome=\"#{esc(o)}\"} #{n}" }
        out << "# HELP gokiq_sidecar_jobs_in_progress Jobs running now."
        out << "# TYPE gokiq_sidecar_jobs_in_progress gauge"
        out << "gokiq_sidecar_jobs_in_progress #{@in_progress}"
        out << "# HELP gokiq_sidecar_job_duration_seconds Time spent running jobs."
        out << "# TYPE gokiq_sidecar_job_duration_seconds histogram"
        cumulative = 0
        BUCKETS.each_with_index do |le, i|
          cumulative += @bucket_counts[i]
          out << "gokiq_sidecar_job_duration_seconds_bucket{le=\"#{le}\"} #{cumulative}"
        end
        out << "gokiq_sidecar_job_duration_seconds_bucket{le=\"+Inf\"} #{@duration_count}"
        out << "gokiq_sidecar_job_duration_seconds_sum #{@duration_sum}"
        out << "gokiq_sidecar_job_duration_seconds_count #{@duration_count}"
        out << "# HELP gokiq_sidecar_exhausted_total Calls to /jobs/exhausted, by class."
        out << "# TYPE gokiq_sidecar_exhausted_total counter"
        @exhausted.each { |k, n| out << "gokiq_sidecar_exhausted_total{class=\"#{esc(k)}\"} #{n}" }
        out.join("\n") << "\n"
      end
    end

    private

    # Called under @lock.
    def bounded(klass)
      return klass if @classes.key?(klass)
      return OTHER if @classes.size >= MAX_CLASSES
      @classes[klass] = true
      klass
    end

    def record(klass, outcome, duration)
      @jobs[[bounded(klass), outcome]] += 1
      i = BUCKETS.index { |le| duration <= le }
      @bucket_counts[i] += 1 if i
      @duration_sum += duration
      @duration_count += 1
    end

    def esc(value)
      value.to_s.gsub("\\", "\\\\\\\\").gsub("\"", "\\\"").gsub("\n", "\\n")
    end
  end
end
