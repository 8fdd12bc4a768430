"""Running a job: the training loop and its Accelerate engine, checkpoints and atomic files, the run
folder, metrics, trackers, plots and preemption. No maths: the step function comes from the job."""
