"""The campaign's stages as file-to-file functions, one per workflow rule (``cgflow wf <step>``).

Each module is one stage and the one place for the HDF5 layout of the files it writes:

* :mod:`.settings` — the validated configuration, the system, backends (counted), seeds.
* :mod:`.points` — CG points with their train/held-out split (``points.h5``).
* :mod:`.start` — iteration 0: starting data and the minimum (``start.h5``), pre-training by
  example (``flow.pt``), the initial points.
* :mod:`.train` — fine-tuning by energy (``flow.pt``, ``train.h5``).
* :mod:`.labels` — flow draws, sharded energies and PMF labels (``samples/``, ``energies/``,
  ``labels.h5``).
* :mod:`.ensemble` — the free-energy ensemble fitted to the labels (``ensemble.pt``).
* :mod:`.select` — CG walkers and the next points (``walkers.h5``, ``points.h5``).
* :mod:`.status` — the convergence checkpoint (``status.json``; no torch).
* :mod:`.evaluate` — metrics against the system's ground truth and the PMF map.
* :mod:`.report` — the campaign summary, the speedup table and backmapped structures.

The Snakemake rules and the in-process runner (:func:`cgflow.campaign.run_campaign`) call these
same functions in the same order with the same seeds.
"""
