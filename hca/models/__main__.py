"""``python -m hca.models import FILE.gguf --out DIR`` / ``bundled NAME --out DIR`` (:func:`hca.models.loading.main`)."""
from hca.models.loading import main

raise SystemExit(main())
