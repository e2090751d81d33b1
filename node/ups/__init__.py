"""AI on request: the Unified Procedure Step service (PS3.4 Annex CC) and the node as Task Performer.

A Task Requester (RIS, PACS, workstation, ``modelnode run``) creates a workitem by N-CREATE;
the node claims the workitems addressed to it, retrieves their inputs from the PACS, runs the
model through the pipeline, stores the results and completes the workitem (IHE AIW-I).

Modules, in the order a workitem meets them:

* :mod:`node.ups.states`: the state machine of PS3.4 Table CC.1.1-2, pure;
* :mod:`node.ups.workitem`: what the node reads from and writes into a workitem dataset;
* :mod:`node.ups.match`: C-FIND matching on workitems;
* :mod:`node.ups.store`: the workitem and subscription tables;
* :mod:`node.ups.subscriptions`: who is told of which workitem's changes;
* :mod:`node.ups.events`: N-EVENT-REPORT delivery to the subscribers;
* :mod:`node.ups.service`: every change to a workitem, for the SCP, the performer and the CLI;
* :mod:`node.ups.scp`: the DIMSE handlers (N-CREATE, N-ACTION, N-GET, N-SET, C-FIND);
* :mod:`node.ups.retrieve`: the inputs into the node, by C-MOVE or C-GET;
* :mod:`node.ups.performer`: the Task Performer thread;
* :mod:`node.ups.pull`: pull mode, workitems taken from another Task Manager.
"""
