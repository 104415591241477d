class NoDeadJob
  include Sidekiq::Worker
  sidekiq_options retry: 0, dead: false

  def perform(*)
    raise "no dead"
  end
end
