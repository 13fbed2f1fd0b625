"""corral's Python SDK for frameworks: a scheduler, a custom executor, their drivers, and offer and task helpers.

A minimal framework::

    from corral.sdk import FrameworkInfo, Scheduler, SchedulerDriver

    class Echo(Scheduler):
        launched = False

        def resource_offers(self, driver, offers):
            for offer in offers:
                if not self.launched and offer.fits(cpus=0.1, mem=32):
                    driver.launch(offer, [offer.task("echo", "echo hi", cpus=0.1, mem=32)])
                    self.launched = True
                else:
                    driver.decline(offer)

        def status_update(self, driver, status):
            if status.is_terminal:
                driver.stop()

    SchedulerDriver(Echo(), FrameworkInfo(name="echo"), "http://127.0.0.1:8500").run_forever()
"""

from corral.sdk.executor import Executor, ExecutorDriver, executor_info, executor_task, task_data
from corral.sdk.messages import FrameworkInfo, TaskState, TaskStatus
from corral.sdk.recordio import RecordIODecoder, RecordIOError
from corral.sdk.resources import InsufficientResources, Offer, id_json, id_value, ranges, scalar, task_info
from corral.sdk.scheduler import CallError, DriverStatus, NotSubscribedError, Scheduler, SchedulerDriver

__all__ = [
    "CallError",
    "DriverStatus",
    "Executor",
    "ExecutorDriver",
    "FrameworkInfo",
    "InsufficientResources",
    "NotSubscribedError",
    "Offer",
    "RecordIODecoder",
    "RecordIOError",
    "Scheduler",
    "SchedulerDriver",
    "TaskState",
    "TaskStatus",
    "executor_info",
    "executor_task",
    "id_json",
    "id_value",
    "ranges",
    "scalar",
    "task_data",
    "task_info",
]
