# Runs every rails_sidecar test in one process:  ruby rails_sidecar/test/run.rb
# (from anywhere; each run uses its own temporary sqlite db). Exits non-zero on failure.
Dir[File.join(__dir__, "**", "*_test.rb")].sort.each { |f| require File.expand_path(f) }
