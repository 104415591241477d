class NoopJob
  include Sidekiq::Worker

  def perform(*)
  end
end
