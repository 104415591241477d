# Sidekiq 6.4.1 itself cannot act on :discard/:kill (6.5.2+ can); the sidecar
# reports them as "discard"/"kill" and gokiq applies the newer semantics.
class RetryInJob
  include Sidekiq::Worker
  sidekiq_options retry: 3

  sidekiq_retry_in do |_count, exception|
    case exception.message
    when "discard" then :discard
    when "kill" then :kill
    else 5
    end
  end

  def perform(mode)
    raise mode.to_s
  end
end
